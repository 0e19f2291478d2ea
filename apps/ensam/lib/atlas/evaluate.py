"""Evaluate segmentation by example: per structure, the atlas-only DSC beside the atlas-then-ensam DSC, the time
per image, and the Spearman correlation between the per-structure uncertainty and the real error.

    cd /work/main && PYTHONPATH=apps/ensam .venv/bin/python -m lib.atlas.evaluate --data sample-datasets/eval \
        --atlases sample-datasets/train --threads 2 --out eval-results/atlas_eval.json

The atlases come from ``--atlases`` only (the training volumes); an image of ``--data`` that is also an atlas
is left out of the atlases while it is segmented (leave-one-out, for tuning on the training set).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Optional

import numpy as np

from lib.evaluation.metrics import dice
from lib.io.volumes import load_volume

from .segment import AtlasLibrary, SegmentByExample, best_route, canonical_name, sitk_threads


def evaluate(data: str, atlases: str, weights: Optional[str], threads: int = 2, cases: Optional[List[str]] = None,
             min_voxels: int = 50, n_fg: int = 2, n_bg: int = 2, use_prev_mask: bool = False, log=print,
             corrections: int = 2,
             validation_file: str = "", floor: float = 0.35) -> Dict:
    import torch

    routes = {}
    if validation_file and os.path.exists(validation_file):
        with open(validation_file) as f:
            routes = {canonical_name(k): best_route(v, floor) for k, v in json.load(f)["validation"].items()}
    sitk_threads(threads)
    torch.set_num_threads(threads)
    engine = None
    if weights:
        from lib.engine import EnsamEngine

        engine = EnsamEngine(weights=weights, device="cpu")
    with open(os.path.join(data, "dataset.json")) as f:
        ds = json.load(f)
    entries = ds.get("testing") or ds.get("training") or []
    rows, images = [], []
    for e in entries:
        case = os.path.basename(e["image"]).split(".")[0]
        if cases and case not in cases:
            continue
        if not e.get("label"):
            continue
        lib = AtlasLibrary.from_dataset(atlases, exclude=[case])
        seg = SegmentByExample(lib, engine, n_fg=n_fg, n_bg=n_bg, use_prev_mask=use_prev_mask,
                               corrections=corrections)
        img = load_volume(os.path.join(data, e["image"]))
        ref = np.asarray(load_volume(os.path.join(data, e["label"])).array)
        names = {canonical_name(n): int(v) for v, n in (e.get("labels") or {}).items()}
        names = {n: v for n, v in names.items() if int(np.count_nonzero(ref == v)) >= min_voxels}
        t, cpu = time.perf_counter(), time.process_time()
        res = seg.segment(img.array, img.affine, list(names), image_key=case,
                          log=lambda m, c=case: log(f"{c}: {m}"))
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        # CPU seconds / threads: what the wall time would be on a machine not shared with other jobs
        images.append({"image": case, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                       "structures": len(names),
                       "segmented": len(res.structures), "stages": res.seconds, "registrations": res.registrations})
        log(f"{case}: {len(res.structures)}/{len(names)} structures in {seconds:.1f}s, {cpu:.1f} CPU s "
            f"({res.seconds})")
        for name, value in names.items():
            gt = ref == value
            s = res.structures.get(name)
            row = {"image": case, "label": name, "voxels": int(np.count_nonzero(gt))}
            if s is None:
                row.update({"atlas_dsc": 0.0, "dsc": 0.0, "uncertainty": None, "atlases": 0,
                            "why": res.missing.get(name, "")})
            else:
                row.update({"atlas_dsc": round(dice(s.atlas_mask, gt), 4), "dsc": round(dice(s.mask, gt), 4),
                            "uncertainty": round(s.uncertainty, 4), "agreement": s.agreement,
                            "atlases": len(s.atlases), "source": s.source})
            if routes:  # what ensam_seg answers: the validated route's mask, nothing for a name it does not offer
                row["route"] = routes.get(name)
                row["routed_dsc"] = {"atlas+ensam": row["dsc"], "atlas": row["atlas_dsc"]}.get(row["route"], 0.0)
            rows.append(row)
    out: Dict = {"data": data, "atlases": atlases, "weights": os.path.basename(weights) if weights else None,
                 "threads": threads, "n_fg": n_fg, "n_bg": n_bg, "use_prev_mask": use_prev_mask,
                 "corrections": corrections,
                 "images": images, "pairs": rows}
    summary = {}
    for im in images:
        r = sorted([x for x in rows if x["image"] == im["image"]], key=lambda x: -x["voxels"])
        top = r[:10]
        summary[im["image"]] = {"top10_dsc": round(float(np.mean([x["dsc"] for x in top])), 4),
                                "top10_atlas_dsc": round(float(np.mean([x["atlas_dsc"] for x in top])), 4),
                                "all_dsc": round(float(np.mean([x["dsc"] for x in r])), 4),
                                "all_atlas_dsc": round(float(np.mean([x["atlas_dsc"] for x in r])), 4),
                                "seconds": im["seconds"], "cpu_seconds": im["cpu_seconds"]}
        if routes:
            summary[im["image"]]["top10_routed_dsc"] = round(float(np.mean([x["routed_dsc"] for x in top])), 4)
            summary[im["image"]]["offered"] = sum(x["route"] is not None for x in r)
    out["summary"] = summary
    out.update(spearman(rows))
    return out


def spearman(rows: List[dict]) -> Dict:
    """Spearman rho between the uncertainty and the real error (1 - DSC of the answer) over the (image, structure)
    pairs that got an answer, and over the 10 largest structures of each image (as the earlier study of the
    token-flip score, README: rho 0.65, n = 20)."""
    from scipy.stats import spearmanr

    out = {}
    scored = [r for r in rows if r["uncertainty"] is not None]
    top = []
    for image in sorted({r["image"] for r in rows}):
        top += sorted([r for r in scored if r["image"] == image], key=lambda r: -r["voxels"])[:10]
    for key, sel in (("spearman_pairs", scored), ("spearman_top10", top)):
        if len(sel) >= 3:
            rho, p = spearmanr([r["uncertainty"] for r in sel], [1 - r["dsc"] for r in sel])
            out[key] = {"rho": round(float(rho), 4), "p": float(p), "n": len(sel)}
    return out


def validation(res: Dict) -> Dict:
    """Leave-one-out validation per name (mean over the training images that carry it): {"atlas+ensam": DSC,
    "atlas": DSC}, what ``ensam_seg`` routes by (``lib.infers.seg_by_example``)."""
    per: Dict[str, Dict[str, List[float]]] = {}
    for r in res["pairs"]:
        if not r.get("atlases"):
            continue
        d = per.setdefault(r["label"], {"atlas+ensam": [], "atlas": []})
        d["atlas+ensam"].append(r["dsc"])
        d["atlas"].append(r["atlas_dsc"])
    return {n: {m: round(float(np.mean(v)), 4) for m, v in d.items()} for n, d in sorted(per.items())}


def markdown(res: Dict) -> str:
    lines = ["| image | structure | voxels | atlases | atlas-only DSC | atlas-then-ensam DSC | uncertainty | route |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["pairs"], key=lambda x: (x["image"], -x["voxels"])):
        u = "" if r["uncertainty"] is None else f"{r['uncertainty']:.3f}"
        route = r.get("route") or ("not offered" if "route" in r else "")
        lines.append(f"| {r['image']} | {r['label']} | {r['voxels']} | {r['atlases']} | {r['atlas_dsc']:.3f} | "
                     f"{r['dsc']:.3f} | {u} | {route} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with dataset.json (images scored)")
    p.add_argument("--atlases", required=True, help="folder with dataset.json (atlases: training volumes)")
    p.add_argument("--weights", default=os.path.join(here, "model", "pretrained_ensam.pt"),
                   help="ensam weights ('' = atlas only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default="", help="comma-separated image names (default all)")
    p.add_argument("--n-fg", type=int, default=2)
    p.add_argument("--n-bg", type=int, default=2)
    p.add_argument("--prev-mask", action="store_true", help="give ensam the fused atlas mask as previous mask")
    p.add_argument("--corrections", type=int, default=2, help="corrective clicks from the atlases after ensam")
    p.add_argument("--out", default="")
    p.add_argument("--routes", default="", help="validation JSON (model/atlas_validation.json): also score what "
                                                "ensam_seg answers with its validated route per name")
    p.add_argument("--floor", type=float, default=0.35)
    p.add_argument("--validation", default="", help="write the leave-one-out validation per name to this JSON "
                                                     "(run on the TRAINING set: --data = --atlases)")
    a = p.parse_args(argv)
    if a.validation and os.path.realpath(a.data) != os.path.realpath(a.atlases):
        p.error("--validation is leave-one-out on the atlases themselves: --data must be the --atlases folder")
    res = evaluate(a.data, a.atlases, a.weights or None, a.threads,
                   [c for c in a.cases.split(",") if c] or None, n_fg=a.n_fg, n_bg=a.n_bg,
                   use_prev_mask=a.prev_mask, validation_file=a.routes, floor=a.floor, corrections=a.corrections)
    print(markdown(res))
    print(json.dumps({k: res[k] for k in ("summary", "spearman_pairs", "spearman_top10") if k in res}, indent=1))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    if a.validation:
        from lib.io.atomic import atomic_write_json

        atomic_write_json({"validation": validation(res), "summary": res["summary"],
                           "method": "leave-one-out on the training atlases (lib.atlas.evaluate --validation)",
                           "threads": a.threads, "weights": res["weights"]}, a.validation)


if __name__ == "__main__":
    main()
