"""``ensam_seg`` by datastore atlases, measured on the hippocampus TUNING subjects (issue 29, item 2).

What the labelling loop's server does with a site's new name once some scans of it are labelled: every other
labelled scan is an atlas. Here each of the 12 ``tune`` subjects of ``sample-datasets/hippocampus``
(``lib.cohorts.subjects("tune")``) is the target in turn, and the other 11 are the atlas pool (leave-one-out),
added in a fixed random order per target so that the atlases of a count are those of the smaller counts plus
more (as labels are saved). Each scan is cropped as the loop's instances are (the whole hippocampus's bounding
box plus ``--margin-mm``), each label is the binary whole hippocampus saved under the name ``hippocampus`` (as the
loop saves it). Per count of atlases: the fused atlas mask's DSC (route ``atlas``) and ensam's from the fused
atlas's box and clicks (route ``atlas+ensam``), with :class:`lib.atlas.segment.SegmentByExample`, the code the
server runs; the time per image (registration of every atlas, then fusion and ensam).

    cd /work/main && OMP_NUM_THREADS=1 PYTHONPATH=apps/ensam nice -n 10 .venv/bin/python \\
        -m lib.experiments.datastore_atlases --counts 1,3,5,8 --threads 1 --out runs/datastore_atlases.json

Settings are decided here (never on the loop subjects nor on ``sample-datasets/eval``): ``--min-cells`` (the
registration's working grid for small images), ``--small-bspline-mm`` (its deformable stage), ``--fusion`` /
``--fusion-power``. Measured (1 thread, load average 3.0 to 3.7 on 2 shared cores; docs/LABELLING_LOOP.md):
fused DSC 0.784 / 0.804 / 0.837 / 0.850 with 1 / 3 / 5 / 8 atlases (local vote, power 3), ensam from the fused
atlas 0.68 to 0.63; 3.6 / 9.6 / 16.0 / 25.3 s per image (about 3 s per atlas registration).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Dict, List, Sequence

import numpy as np

from lib.cohorts import HIPPOCAMPUS_ROOT, UNION_VALUE, read_unions, structure_mask, subjects

NAME = "hippocampus"
WEIGHTS = os.path.join(os.path.dirname(HIPPOCAMPUS_ROOT.parent), "apps", "ensam", "model", "pretrained_ensam.pt")


def write_crops(names: Sequence[str], folder: str, margin_mm: float) -> Dict[str, dict]:
    """Each subject's crop around its whole hippocampus (image and binary label NIfTI in ``folder``), as the
    labelling loop's instances are made: ``{subject: {"image", "label", "reference" (bool array)}}``."""
    import nibabel as nib

    from lib.geometry import spacing_from_affine
    from lib.io.volumes import load_volume

    from .labelling_loop.instances import crop_bounds

    with open(HIPPOCAMPUS_ROOT / "dataset.json") as f:
        unions = read_unions(json.load(f))
    out = {}
    for s in names:
        img = load_volume(str(HIPPOCAMPUS_ROOT / "imagesTr" / f"{s}.nii.gz"))
        lab = np.asarray(load_volume(str(HIPPOCAMPUS_ROOT / "labelsTr" / f"{s}.nii.gz")).array)
        mask = structure_mask(lab, UNION_VALUE, unions)
        c = crop_bounds(mask, spacing_from_affine(img.affine), margin_mm)
        sl = tuple(slice(c[2 * a], c[2 * a + 1]) for a in range(3))
        aff = np.asarray(img.affine, np.float64).copy()
        aff[:3, 3] = aff[:3, :3] @ np.array([c[0], c[2], c[4]], np.float64) + aff[:3, 3]
        paths = {k: os.path.join(folder, f"{s}_{k}.nii.gz") for k in ("image", "label")}
        nib.save(nib.Nifti1Image(np.ascontiguousarray(np.asarray(img.array)[sl]), aff), paths["image"])
        nib.save(nib.Nifti1Image(mask[sl].astype(np.uint8), aff), paths["label"])
        out[s] = dict(paths, reference=mask[sl])
    return out


def run(counts: Sequence[int], threads: int = 1, margin_mm: float = 15.0, min_cells: int = 32,
        bspline_mm: float = 0.0, small_bspline_mm: float = 10.0, corrections: int = 2, fusion: str = "local",
        fusion_power: float = 3.0, engine=True, targets: Sequence[str] = (), pool: Sequence[str] = (),
        seed: int = 0, log=print) -> dict:
    """Rows per (target, count of atlases) and their means; see the module's docstring."""
    import torch

    from lib.atlas.registration import RegistrationConfig
    from lib.atlas.segment import Atlas, AtlasLibrary, SegmentByExample, sitk_threads
    from lib.evaluation.metrics import dice
    from lib.io.volumes import load_volume

    sitk_threads(threads)
    torch.set_num_threads(threads)
    eng = None
    if engine:
        from lib.engine import EnsamEngine

        eng = EnsamEngine(weights=WEIGHTS, device="cpu")
    pool = list(pool) or subjects("tune")
    targets = list(targets) or list(pool)
    counts = sorted({int(k) for k in counts})
    cfg = RegistrationConfig(min_cells=min_cells, bspline_mm=bspline_mm, small_bspline_mm=small_bspline_mm)
    rows: List[dict] = []
    per_image: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        crops = write_crops(sorted(set(pool) | set(targets)), tmp, margin_mm)
        for t in targets:
            others = [s for s in pool if s != t]
            rng = np.random.default_rng([seed, int(t.split("_")[-1])])
            order = [others[i] for i in rng.permutation(len(others))]
            # the rank is in the key: the library's selection (sorted by key) then takes the first k of this order
            atlases = [Atlas(f"{r:02d}:{s}", crops[s]["image"], crops[s]["label"], {NAME: 1}, "MR", "datastore")
                       for r, s in enumerate(order)]
            seg = SegmentByExample(AtlasLibrary(atlases, cfg), eng, corrections=corrections, fusion=fusion,
                                   fusion_power=fusion_power)
            vol = load_volume(crops[t]["image"])
            ref = crops[t]["reference"]
            t_img = time.perf_counter()
            for k in counts:
                if k > len(atlases):
                    continue
                seg.max_atlases = k
                t0, c0 = time.perf_counter(), time.process_time()
                res = seg.segment(vol.array, vol.affine, [NAME], image_key=t, log=lambda m: None)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                s = res.structures.get(NAME)
                row = {"target": t, "atlases": k, "atlas_keys": [a.key for a in atlases[:k]],
                       "atlas_dsc": round(dice(s.atlas_mask, ref), 4) if s else 0.0,
                       "dsc": round(dice(s.mask, ref), 4) if s else 0.0,
                       "agreement": None if s is None or s.agreement is None else round(s.agreement, 4),
                       "seconds_added": round(wall, 2), "cpu_seconds_added": round(cpu, 2),
                       "registration_seconds": [r["seconds"] for r in res.registrations.values()],
                       "segmentation_seconds": res.seconds["segmentation"]}
                rows.append(row)
                log(f"{t} k={k}: atlas {row['atlas_dsc']:.3f} atlas+ensam {row['dsc']:.3f} "
                    f"(+{wall:.1f}s wall, {cpu:.1f} CPU s)")
            per_image.append({"target": t, "shape": list(vol.shape), "seconds_all_counts": round(
                time.perf_counter() - t_img, 2)})
    summary = {}
    for k in counts:
        got = [r for r in rows if r["atlases"] == k]
        if not got:
            continue
        reg = [x for r in got for x in r["registration_seconds"]]
        summary[str(k)] = {"n": len(got), "atlas_dsc": round(float(np.mean([r["atlas_dsc"] for r in got])), 4),
                           "dsc": round(float(np.mean([r["dsc"] for r in got])), 4),
                           "dsc_min": round(float(np.min([r["dsc"] for r in got])), 4)}
        summary[str(k)]["registration_s_per_atlas"] = round(float(np.mean(reg)), 2) if reg else None
    # time per image of a fresh request with k atlases: its k registrations, then fusion and ensam
    for k, v in summary.items():
        got = [r for r in rows if r["atlases"] == int(k)]
        v["segmentation_s"] = round(float(np.mean([r["segmentation_seconds"] for r in got])), 2)
        v["seconds_per_image"] = round(float(np.mean([sum(r["registration_seconds"]) + r["segmentation_seconds"]
                                                      for r in got])), 2)
    return {"experiment": "ensam_seg by datastore atlases, hippocampus tuning subjects, leave-one-out (issue 29)",
            "settings": {"counts": counts, "threads": threads, "margin_mm": margin_mm, "min_cells": min_cells,
                         "bspline_mm": bspline_mm, "small_bspline_mm": small_bspline_mm,
                         "fusion": fusion, "fusion_power": fusion_power, "corrections": corrections,
                         "engine": bool(engine),
                         "weights": os.path.basename(WEIGHTS) if engine else None, "seed": seed,
                         "targets": targets, "pool": list(pool)},
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "load_average": list(os.getloadavg())},
            "summary": summary, "rows": rows, "images": per_image}


def table(result: dict) -> str:
    lines = ["| atlases | atlas DSC | atlas+ensam DSC (min) | registration s/atlas | fusion+ensam s | s per image |",
             "|---|---|---|---|---|---|"]
    for k, v in result["summary"].items():
        lines.append(f"| {k} | {v['atlas_dsc']:.3f} | {v['dsc']:.3f} ({v['dsc_min']:.3f}) | "
                     f"{v['registration_s_per_atlas']} | {v['segmentation_s']} | {v['seconds_per_image']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="1,3,5,8", help="numbers of atlases (comma-separated)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--margin-mm", type=float, default=15.0)
    p.add_argument("--min-cells", type=int, default=32, help="RegistrationConfig.min_cells (0: 5 mm grid)")
    p.add_argument("--bspline-mm", type=float, default=0.0, help="deformable stage for every image (0: none)")
    p.add_argument("--small-bspline-mm", type=float, default=10.0,
                   help="deformable stage for small images when --bspline-mm is 0 (0: none)")
    p.add_argument("--corrections", type=int, default=2)
    p.add_argument("--fusion", default="local", choices=("majority", "local"),
                   help="vote of the atlases: equal, or weighted per voxel by local intensity similarity")
    p.add_argument("--fusion-power", type=float, default=3.0, help="power of the local weights (--fusion local)")
    p.add_argument("--no-engine", action="store_true", help="atlas-only (no ensam refinement)")
    p.add_argument("--targets", default="", help="subjects to segment (default: all tuning subjects)")
    p.add_argument("--pool", default="", help="atlas subjects (default: the tuning subjects)")
    p.add_argument("--out", default="runs/datastore_atlases.json")
    a = p.parse_args(argv)
    split = (lambda s: [x for x in s.split(",") if x])
    load0 = list(os.getloadavg())
    res = run([int(x) for x in a.counts.split(",")], a.threads, a.margin_mm, a.min_cells, a.bspline_mm,
              a.small_bspline_mm, a.corrections, a.fusion, a.fusion_power, not a.no_engine, split(a.targets),
              split(a.pool))
    res["machine"]["load_average_start"] = load0
    print(table(res))
    print(f"threads {a.threads}; load average {res['machine']['load_average']}")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
