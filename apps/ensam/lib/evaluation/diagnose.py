"""Two diagnostics of the interactive model on a labelled set (the evaluation set by default).

    PYTHONPATH=apps/ensam python -m lib.evaluation.diagnose clicks [--weights W] [--data D]
    PYTHONPATH=apps/ensam python -m lib.evaluation.diagnose ceiling [--data D]

``clicks``: the box protocol with the evaluator's seeds; for every corrective click, whether the clicked voxel
ends up on the right side, how many voxels the step changed and how much DSC moved, by click type.
``ceiling``: how well the 64^3 model grid of each structure's box ROI can represent it (ground truth resampled to
the grid and back; DSC / NSD at 2 mm): what a perfect network could reach without native-resolution refinement.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.evaluation.diagnose", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["clicks", "ceiling"])
    ap.add_argument("--data", default="sample-datasets/eval")
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
    res = click_effects(EnsamMethod(weights=a.weights or default_ensam_weights()), a.data)
    for kind, rows in res.items():
        v = np.asarray(rows, dtype=float).reshape(-1, 3)
        print(f"{kind} clicks: {len(v)}, honoured {v[:, 0].mean():.2f}, mean DSC change {v[:, 1].mean():+.4f}, "
              f"median voxels changed {np.median(v[:, 2]):.0f}, share lowering DSC {(v[:, 1] < 0).mean():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
