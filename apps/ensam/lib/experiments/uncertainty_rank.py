"""Does the ``uncertainty`` score rank a family's unlabelled scans by the error ``ensam_seg`` makes on them?

Without the server loop (issue 29, item 2): a family's instances are cropped as the labelling loop crops them
(:mod:`lib.experiments.labelling_loop.instances`); ``k`` of them (a seeded draw; the ``k`` of a larger count are
those of the smaller plus more, as labels are saved) are the datastore's labels, the others are unlabelled. For
every unlabelled instance it computes what the server computes:

* the ANSWER of ``ensam_seg`` for the family's name: the datastore's atlases (all ``k``, up to 8) registered and
  fused by the local vote; the route (``atlas``: the fused mask, or ``atlas+ensam``: the engine from its box and
  clicks) chosen by the leave-one-out over the ``k`` labelled ones, as ``EnsamSegByExample.routes`` chooses it;
  its error ``1 - DSC`` against the reference;
* the OLD score (``EnsamSegByExample.uncertainty``: 4 atlases, majority vote, 1 - mean pairwise Dice of their
  masks and the engine's mask);
* the features of the NEW score (:mod:`lib.activelearning.features`) and the new score
  (:func:`lib.activelearning.features.predicted_error`);

then Spearman's rho (``scipy.stats.spearmanr``) between each score and the error over the unlabelled instances,
per ``k`` and draw, and pooled over draws.

    cd /work/main && OMP_NUM_THREADS=1 PYTHONPATH=apps/ensam nice -n 10 .venv/bin/python \\
        -m lib.experiments.uncertainty_rank --family hippocampus --ks 3,6 --out runs/uncertainty_rank_hc.json

Families: ``hippocampus`` (the 20 ``loop`` subjects; ``--cases tune`` for the 12 tuning subjects, where the
constants were chosen), ``vertebrae`` (the vertebrae of the training CTs), or any preset of the labelling loop.
``--no-old``, ``--no-engine-features`` and ``--route atlas`` make a run cheaper (the tuning run used all three).

Measured (2026-12-07, shipped weights, 1 thread, load average 8 to 10 on 2 shared cores; draw 0): hippocampus loop
subjects, route ``atlas`` (leave-one-out), k = 3 (n 17): old score rho 0.34 (p 0.19), new 0.46 (p 0.064);
k = 6 (n 14): old 0.50 (p 0.069), new 0.54 (p 0.045). Tuning subjects, k = 3 (n 9): old 0.22, new 0.68.
Vertebrae (11 of the training CTs' vertebrae, ``--limit 12``), k = 3 (n 8, route ``atlas``, mean error 0.68): old
-0.86 (p 0.007), new -0.38 (p 0.35): the atlases agree most where they are all wrong together (probably a periodic
spine: every atlas settling on the same neighbouring vertebra; not checked), so agreement does not rank this family;
k = 6 (n 5, route ``atlas+ensam``, mean error 0.77): old -0.30, new 0.70 (p 0.19; n too small to say anything).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..io.atomic import atomic_write_json
from ..activelearning.features import FEATURES, atlas_answer_features, predicted_error

SCORES = ("old",) + tuple(FEATURES) + ("new",)


def family_instances(family: str, folder: str, cases: str = "", margin_mm: float = 15.0,
                     min_voxels: int = 200, limit: int = 0, seed: int = 0):
    """The family's instances (``labelling_loop.instances.Instance``), their crops written into ``folder``;
    ``cases``: a subject split of ``lib.cohorts`` (``loop``, ``tune``) instead of the preset's."""
    from .labelling_loop.config import family_config
    from .labelling_loop.instances import build_instances, find_instances, select

    preset = family_config(family)
    names = preset["cases"]
    if cases:
        from lib.cohorts import subjects

        names = tuple(subjects(cases, preset["data"]))
    found = find_instances(preset["data"], preset["pattern"], preset.get("modality", ""), min_voxels, names)
    chosen = select(found, limit, seed)
    return preset, build_instances(chosen, os.path.join(folder, "images"), os.path.join(folder, "labels"),
                                   margin_mm)


def spearman(scores: Sequence[float], errors: Sequence[float]) -> Dict[str, Optional[float]]:
    """{"rho", "p", "n"}; rho and p are None with fewer than 3 pairs or a constant side."""
    from scipy.stats import spearmanr

    n = len(scores)
    if n < 3 or len(set(scores)) < 2 or len(set(errors)) < 2:
        return {"rho": None, "p": None, "n": n}
    rho, p = spearmanr(scores, errors)
    return {"rho": round(float(rho), 4), "p": round(float(p), 4), "n": n}


class _Family:
    """The instances as volumes, and one registration cache for every (target, atlas) pair of the run."""

    def __init__(self, instances, modality: str, engine, threads: int = 1, reg_cfg=None):
        from lib.atlas.registration import RegistrationConfig
        from lib.atlas.segment import Atlas, AtlasLibrary, SegmentByExample, sitk_threads
        from lib.infers.seg_by_example import DATASTORE_FUSION
        from lib.io.volumes import load_volume

        sitk_threads(threads)
        self.instances = {i.image_id: i for i in instances}
        self.volumes = {i.image_id: load_volume(os.path.join(os.path.dirname(os.path.dirname(i.gt_path)), "images",
                                                             i.image_id + ".nii.gz")) for i in instances}
        self.refs = {k: np.asarray(load_volume(i.gt_path).array) > 0 for k, i in self.instances.items()}
        # the keys the server gives them (datastore:<image id>): the old score's 4 atlases are the first 4 of them
        self.atlases = {k: Atlas(f"datastore:{k}", os.path.join(os.path.dirname(os.path.dirname(i.gt_path)),
                                                                 "images", k + ".nii.gz"), i.gt_path, {"x": 1},
                                 modality, "datastore") for k, i in self.instances.items()}
        self.library = AtlasLibrary(list(self.atlases.values()), reg_cfg or RegistrationConfig())
        self.seg = SegmentByExample(self.library, engine, cache_images=len(instances) + 1, **DATASTORE_FUSION)
        self.engine = engine
        self.fusion = dict(DATASTORE_FUSION)

    def volume_mm3(self, mask: np.ndarray, image_id: str) -> float:
        from lib.geometry import spacing_from_affine

        return float(np.count_nonzero(mask)) * float(np.prod(spacing_from_affine(self.volumes[image_id].affine)))

    def configure(self, atlases: Sequence[str], fusion: str = "local", max_atlases: int = 8):
        """The registration cache's SegmentByExample set up as ``ensam_seg`` sets it up (datastore pool: up to 8
        atlases, local vote) or as the old score did (4 atlases, majority vote)."""
        seg = self.seg
        seg.library = self.library.subset(sorted((self.atlases[a] for a in atlases), key=lambda a: a.key))
        seg.max_atlases = max_atlases
        seg.fusion = fusion
        return seg

    def segment(self, target: str, atlases: Sequence[str], fusion: str = "local", max_atlases: int = 8):
        vol = self.volumes[target]
        res = self.configure(atlases, fusion, max_atlases).segment(vol.array, vol.affine, ["x"], image_key=target,
                                                                   log=lambda m: None)
        return res.structures.get("x")


def route_by_leave_one_out(fam: _Family, labelled: Sequence[str], validation_atlases: int = 3) -> dict:
    """As ``EnsamSegByExample.datastore_validation``: each labelled instance segmented from up to 3 of the others
    (sorted by key); the route with the higher mean DSC."""
    from lib.evaluation.metrics import dice

    keys = sorted(labelled, key=lambda k: fam.atlases[k].key)
    got = {"atlas": [], "atlas+ensam": []}
    for a in keys:
        others = [o for o in keys if o != a][:validation_atlases]
        s = fam.segment(a, others, fusion=fam.fusion["fusion"])
        got["atlas"].append(dice(s.atlas_mask, fam.refs[a]) if s else 0.0)
        got["atlas+ensam"].append(dice(s.mask, fam.refs[a]) if s else 0.0)
    means = {m: float(np.mean(v)) for m, v in got.items()}
    return {"route": max(means, key=lambda m: (means[m], m == "atlas+ensam")), "validation": means}


def score_instance(fam: _Family, target: str, labelled: Sequence[str], route: str, old: bool = True,
                   engine_features: bool = True) -> dict:
    """The error of ``ensam_seg``'s answer on ``target`` and every score of it (``old``: also the old score;
    ``engine_features``: also the features that need the engine's answer when the route does not)."""
    from lib.evaluation.metrics import dice

    vol = fam.volumes[target]
    ref_volumes = [fam.volume_mm3(fam.refs[k], k) for k in labelled]
    s, feats = atlas_answer_features(fam.configure(labelled, fam.fusion["fusion"]), vol.array, vol.affine, "x",
                                     route, target, ref_volumes, use_engine=engine_features or route != "atlas")
    if s is None:  # no atlas puts the structure in the image: nothing answered, every score at its maximum
        return dict({sc: 1.0 for sc in SCORES}, image=target, error=1.0, missing=True)
    answer = s.atlas_mask if route == "atlas" else s.mask
    row = {"image": target, "error": 1.0 - dice(answer, fam.refs[target]),
           "fused_error": 1.0 - dice(s.atlas_mask, fam.refs[target]), **feats, "new": predicted_error(feats)}
    if s.source == "atlas+ensam":
        row["engine_error"] = 1.0 - dice(s.mask, fam.refs[target])
    if old:
        o = fam.segment(target, labelled, fusion="majority", max_atlases=4)
        row["old"] = o.uncertainty if o is not None else 1.0
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}


def run(family: str, ks: Sequence[int], draws: int = 1, seed: int = 0, cases: str = "", threads: int = 1,
        limit: int = 0, margin_mm: float = 15.0, weights: str = "", progress: bool = True, log=print,
        on_result=None, old: bool = True, engine_features: bool = True, route: str = "auto") -> dict:
    """Rows and rank correlations per draw and ``k`` (see the module's docstring); ``on_result(records so far)``
    after each."""
    import torch

    from lib.engine import EnsamEngine

    from .labelling_loop.config import APP_DIR

    torch.set_num_threads(threads)
    weights = weights or os.path.join(APP_DIR, "model", "pretrained_ensam.pt")
    engine = EnsamEngine(weights=weights, device="cpu")
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    ks = sorted({int(k) for k in ks})
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        preset, instances = family_instances(family, tmp, cases, margin_mm, limit=limit, seed=seed)
        fam = _Family(instances, preset.get("modality", ""), engine, threads)
        ids = sorted(fam.instances)
        log(f"{family}: {len(ids)} instances")
        results: List[dict] = []
        for d in range(draws):
            order = [ids[i] for i in np.random.default_rng([seed, d]).permutation(len(ids))]
            for k in ks:
                if k >= len(ids) - 2:
                    continue
                labelled, unlabelled = order[:k], order[k:]
                chosen = route_by_leave_one_out(fam, labelled) if route == "auto" else {"route": route,
                                                                                        "validation": None}
                it = unlabelled
                if progress and tqdm is not None:
                    it = tqdm(unlabelled, desc=f"{family} draw {d} k={k}", leave=False)
                rows = [score_instance(fam, t, labelled, chosen["route"], old, engine_features) for t in it]
                rec = {"draw": d, "k": k, "labelled": labelled, "route": chosen, "rows": rows,
                       "spearman": {sc: spearman([r[sc] for r in rows], [r["error"] for r in rows])
                                    for sc in SCORES if all(sc in r for r in rows)}}
                results.append(rec)
                if on_result is not None:
                    on_result(results)
                log(f"draw {d} k={k} route {chosen['route']} mean error {np.mean([r['error'] for r in rows]):.3f}: "
                    + ", ".join(f"{sc} {v['rho']}" for sc, v in rec["spearman"].items()))
    pooled = {}
    for k in ks:
        recs = [r for r in results if r["k"] == k]
        if not recs:
            continue
        pooled[str(k)] = {sc: {"rho_per_draw": [r["spearman"].get(sc, {}).get("rho") for r in recs],
                               "rho_mean": _mean([r["spearman"].get(sc, {}).get("rho") for r in recs])}
                          for sc in SCORES}
    return {"experiment": "uncertainty score vs the error of ensam_seg on the unlabelled instances (issue 29)",
            "family": family, "cases": cases or "preset", "ks": ks, "draws": draws, "route": route,
            "seed": seed, "weights": os.path.basename(weights), "threads": threads,
            "machine": {"platform": platform.platform(), "load_average": list(os.getloadavg())},
            "seconds": round(time.time() - t0, 1), "pooled": pooled, "results": results}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(float(np.mean(xs)), 4) if xs else None


def table(res: dict) -> str:
    lines = ["| k | draw | n | route | mean error | " + " | ".join(SCORES) + " |",
             "|---|---|---|---|---|" + "---|" * len(SCORES)]
    for r in res["results"]:
        cells = []
        for sc in SCORES:
            s = r["spearman"].get(sc) or {"rho": None}
            cells.append("-" if s["rho"] is None else f"{s['rho']:.2f} (p {s['p']:.2g})")
        lines.append(f"| {r['k']} | {r['draw']} | {len(r['rows'])} | {r['route']['route']} | "
                     f"{np.mean([x['error'] for x in r['rows']]):.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="hippocampus", help="a labelling-loop preset (hippocampus, vertebrae, ...)")
    p.add_argument("--cases", default="", help="a subject split instead of the preset's (tune, loop)")
    p.add_argument("--ks", default="3,6", help="labelled instances (comma-separated)")
    p.add_argument("--draws", type=int, default=1, help="seeded draws of the labelled instances")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="instances drawn from the family (0 = all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", default="", help="default: model/pretrained_ensam.pt")
    p.add_argument("--no-old", action="store_true", help="skip the old score (4 atlases, majority, the engine)")
    p.add_argument("--no-engine-features", action="store_true",
                   help="the engine's answer only where the route needs it (the 'route' feature left out)")
    p.add_argument("--route", default="auto", choices=("auto", "atlas", "atlas+ensam"),
                   help="the answer's route (auto: by the leave-one-out over the labelled, as ensam_seg)")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)

    def partial(results):
        if a.out:
            atomic_write_json(results, a.out + ".partial")

    res = run(a.family, [int(x) for x in a.ks.split(",") if x], a.draws, a.seed, a.cases, a.threads, a.limit,
              weights=a.weights, on_result=partial, old=not a.no_old, engine_features=not a.no_engine_features,
              route=a.route)
    print(table(res))
    for k, v in res["pooled"].items():
        print(f"k={k}: mean rho over draws: " + ", ".join(f"{sc} {v[sc]['rho_mean']}" for sc in SCORES))
    if a.out:
        atomic_write_json(res, a.out)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
