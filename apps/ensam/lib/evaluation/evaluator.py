"""The interactive evaluator: one box, then corrective clicks (or strokes), for every labelled structure of a dataset.

Protocol (CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image Segmentation", adapted to a full 3D box
as a Slicer ROI gives it; see /work/shared/notes/model-and-evaluation.md):

* step 0: box prompt = the structure's 3D bounding box, each side moved outward by a random 0..3 voxels
  (:func:`lib.prompts.box_from_mask`, seeded per structure);
* steps 1..5: one click each from :func:`lib.prompts.next_click` (deepest voxel of the largest 26-connected error
  component); the method receives the box, ALL clicks so far and its previous mask at every step. When the
  prediction is already perfect there is no click: the step is not run and the previous mask and scores carry
  over (``no_click`` in the results);
* DSC per step; NSD at 2 mm with the real voxel spacing, computed only when DSC > 0.2 (else 0);
  DSC_AUC / NSD_AUC = trapezoid over the 5 click steps with unit spacing (range 0..4, perfect = 4; the box step is
  not included); final = after the 5th click; box = after step 0;
* seconds per step (wall clock around ``predict``) and peak memory per step: the process's resident set size
  (RSS, via psutil) sampled every 2 ms in a background thread during ``predict``, minus the RSS before the call
  (so it covers NumPy, PyTorch and C/C++ allocations alike; allocations shorter than the sampling interval can
  be missed). On CUDA, ``torch.cuda.max_memory_allocated`` is reported as well.
* per structure, then overall = mean over structures (every structure weighs the same, whatever its image).
  The challenge's 90 s per structure budget is not enforced; ``over_budget`` flags structures that exceeded it.

Randomness: each structure gets its own generator seeded from ``(seed, image name, label id)``, so results do
not depend on the order or subset of structures or methods.

This module is the protocol; the summaries and reports (``summarize``, ``results_markdown``, ``write_results``) are
:mod:`lib.evaluation.report`, the memory meter and machine description :mod:`lib.evaluation.measure`, both
importable from here as before. The command line is ``python -m lib.evaluation`` (``__main__.py``).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from ..cohorts import read_unions, structure_mask
from ..prompts.simulation import box_from_mask, next_click, next_stroke
from ..prompts.strokes import prompts_from_masks
from .measure import _cuda_peak_reset, _PeakRSS, machine_info
from .metrics import auc, dice, protocol_nsd, spacing_from_affine
from .report import (HARM_DSC, SUMMARY_KEYS, correction_drops, plot_curves, results_markdown, summarize,
                     write_results)

__all__ = ["Method", "EnsamMethod", "Case", "load_dataset", "evaluate_structure", "evaluate", "summarize",
           "write_results", "PROTOCOL", "STARTS", "CORRECTIONS", "STROKE_RULE", "run_name", "correction_drops",
           "results_markdown", "plot_curves", "machine_info", "SUMMARY_KEYS", "HARM_DSC"]

logger = logging.getLogger(__name__)

PROTOCOL = {
    "box": "full 3D bounding box of the label, each side moved outward by random 0..jitter voxels",
    "jitter_voxels": 3,
    "clicks": 5,
    "click_rule": "deepest voxel (EDT in voxel units, image border = outside) of the largest 26-connected "
                  "component of pred XOR gt; foreground if gt is set there; ties broken with the seeded rng",
    "nsd_tolerance_mm": 2.0,
    "nsd_min_dsc": 0.2,
    "auc": "trapezoid over the 5 click steps, unit spacing (0..4)",
    "memory": "peak RSS above the pre-call RSS during predict, sampled every 2 ms (psutil)",
    "time_budget_s": 90.0,
    "click_start": "step 0 = one foreground click at the deepest voxel of the label (largest component), no box "
                   "at any step; then the same corrective clicks (method rows named '<method> (click start)')",
}
STARTS = ("box", "click")
CORRECTIONS = ("clicks", "strokes")
STROKE_RULE = ("a stroke instead of a click (lib.prompts.simulation.next_stroke): the longest path along the medial "
               "axis of the largest 26-connected error component's cross-section through its deepest voxel (the "
               "axis-aligned slice where that cross-section is largest in mm2), foreground if gt is set at the "
               "deepest voxel; every stroke so far becomes foreground/background points by "
               "lib.prompts.strokes.prompts_from_masks, the conversion the ensam_scribbles server task uses")


def run_name(method_name: str, start: str, corrections: str = "clicks") -> str:
    """The results key of a method under a start protocol and a kind of correction: the plain name for the box
    start with clicks; '(click start)', '(strokes)' or '(click start, strokes)' otherwise."""
    tags = ([] if start == "box" else ["click start"]) + ([] if corrections == "clicks" else [corrections])
    return f"{method_name} ({', '.join(tags)})" if tags else method_name


@runtime_checkable
class Method(Protocol):
    """What the evaluator drives. Same conventions as the engine contract (docs/ARCHITECTURE.md).

    ``predict(image, affine, boxes, points, point_labels, prev_mask) -> uint8 (X, Y, Z)``:

    * ``image``: ``(X, Y, Z)`` array exactly as stored (e.g. int16 HU), indexed ``[i, j, k]``;
    * ``affine``: 4x4 voxel index -> world mm;
    * ``boxes``: list of ``[i0, i1, j0, j1, k0, k1]`` (inclusive voxel indices); one box here;
    * ``points``: ``(N, 3)`` int voxel indices ``[i, j, k]`` (N = 0 at the box step);
    * ``point_labels``: ``(N,)`` 1 = foreground click, 0 = background click;
    * ``prev_mask``: ``(X, Y, Z)`` uint8 previous prediction, ``None`` at the box step.

    Optional ``reset()`` is called before each structure (drop per-structure state, keep image caches).
    Optional ``new_run()`` is called before each run (one start protocol x one kind of correction) on each image:
    drop everything earlier runs left, image caches included, so that a run scores the same whichever runs came
    before it in the process (the engine's ROI cache once let the click-start protocol reuse the ROIs that the box
    protocol had fitted to the same structures from their ground-truth boxes).
    """

    name: str

    def predict(self, image: np.ndarray, affine: np.ndarray, boxes: List[np.ndarray], points: np.ndarray,
                point_labels: np.ndarray, prev_mask: Optional[np.ndarray]) -> np.ndarray:
        ...


class EnsamMethod:
    """Adapter from :class:`lib.engine.EnsamEngine` to the :class:`Method` interface (engine imported lazily)."""

    name = "ensam"

    def __init__(self, weights: Optional[str] = None, device: str = "cpu", engine=None, name: str = "ensam",
                 config=None):
        self.name = name
        if engine is None:
            from ..engine import EnsamEngine  # lazy: the evaluator works without the engine/torch

            engine = EnsamEngine(weights=weights, device=device, config=config)
        self.engine = engine
        self._last_info: Optional[dict] = None  # the running session's previous step (its ROI may be reused)

    @staticmethod
    def _key(image, affine) -> str:
        from ..engine import image_fingerprint  # cheap (strided sample); keeps the engine's encoding cache warm

        return image_fingerprint(image, affine)

    def predict(self, image, affine, boxes, points, point_labels, prev_mask):
        pts = np.asarray(points).reshape(-1, 3)
        mask = self.engine.segment(
            image, affine,
            points=pts if len(pts) else None,
            point_labels=np.asarray(point_labels).reshape(-1) if len(pts) else None,
            boxes=[np.asarray(b).tolist() for b in boxes] if boxes else None,
            prev_mask=prev_mask,
            image_key=self._key(image, affine),
            prev_info=self._last_info if prev_mask is not None else None,  # a session's step follows its previous
        )
        self._last_info = self.engine.last_info
        return mask

    def new_run(self) -> None:
        """A new protocol run: the engine's encodings and ROIs of earlier runs are forgotten."""
        self.engine.cache.clear()


def default_ensam_weights() -> Optional[str]:
    """The fine-tuned weights if present, else the shipped pretrained ones (None if neither exists)."""
    model_dir = Path(__file__).resolve().parents[2] / "model"
    for name in ("ensam.pt", "pretrained_ensam.pt"):
        if (model_dir / name).is_file():
            return str(model_dir / name)
    return None


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    image: Path
    label: Path
    modality: str = ""
    labels: Dict[int, str] = field(default_factory=dict)
    unions: Dict[int, tuple] = field(default_factory=dict)  # value -> member values (lib.cohorts: a structure
    #                                                           that is the union of labelled parts)


def load_dataset(data_dir, cases: Optional[Sequence[str]] = None) -> List[Case]:
    """Cases of ``<data_dir>/dataset.json`` (its ``testing`` list, else ``training``). Each entry has ``image``,
    ``label`` (paths relative to data_dir), optional ``modality`` and ``labels`` (id -> name; if missing, the
    non-zero ids present in the label file), optional ``unions`` (``{"3": [1, 2]}``: structure 3 is the union of
    1 and 2, evaluated when all its members are present). ``cases``: keep only entries whose image name contains
    one of these strings."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "dataset.json").read_text())
    entries = meta.get("testing") or meta.get("training") or []
    out = []
    for e in entries:
        if not isinstance(e, dict) or "label" not in e:
            continue
        img = data_dir / e["image"]
        name = img.name[:-7] if img.name.endswith(".nii.gz") else img.stem
        if cases and not any(c in name for c in cases):
            continue
        labels = {int(k): str(v) for k, v in (e.get("labels") or {}).items()}
        out.append(Case(name, img, data_dir / e["label"], e.get("modality", ""), labels, read_unions(e)))
    if not out:
        raise ValueError(f"no cases with labels in {data_dir / 'dataset.json'}")
    return out


def _load(case: Case):
    """(image, affine, int32 labels) of a case, read by THE volume loader (``lib.io.volumes.load_volume``)."""
    from ..io.volumes import load_volume

    im = load_volume(str(case.image))
    labels = load_volume(str(case.label)).array.astype(np.int32)
    if im.array.shape != labels.shape:
        raise ValueError(f"{case.name}: image {im.array.shape} and label {labels.shape} differ")
    return im.array, im.affine, labels


def _structure_seed(seed: int, case_name: str, label_id: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(case_name.encode()), int(label_id)]))


def evaluate_structure(method, image: np.ndarray, affine: np.ndarray, gt: np.ndarray, rng: np.random.Generator,
                       n_clicks: int = 5, jitter: int = 3, tolerance_mm: float = 2.0,
                       measure_memory: bool = True, start: str = "box", corrections: str = "clicks") -> dict:
    """Run the protocol for one structure. ``gt``: ``(X, Y, Z)`` binary. ``start``: ``"box"`` (step 0 = the
    jittered box, kept at every step) or ``"click"`` (step 0 = one foreground click at the label's deepest voxel,
    no box at any step). ``corrections``: ``"clicks"`` or ``"strokes"`` (each corrective step paints a stroke,
    :data:`STROKE_RULE`; the method gets the start prompt plus the points of every stroke so far, in ``points``).
    Returns per-step lists (index 0 = the start prompt, 1..n_clicks = corrections) ``dsc``, ``nsd``, ``seconds``,
    ``peak_mb`` and the summary numbers."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, not {start!r}")
    if corrections not in CORRECTIONS:
        raise ValueError(f"corrections must be one of {CORRECTIONS}, not {corrections!r}")
    gt = np.asarray(gt) != 0
    spacing = spacing_from_affine(affine)
    if hasattr(method, "reset"):
        method.reset()
    if start == "box":
        box = box_from_mask(gt, jitter=jitter, rng=rng)
        boxes = [box]
        points = np.zeros((0, 3), dtype=np.int64)
        plabels = np.zeros((0,), dtype=np.int64)
    else:
        box = None
        boxes = []
        first, _ = next_click(None, gt, rng)  # the deepest voxel of the label (largest component)
        points = first[None].astype(np.int64)
        plabels = np.ones(1, dtype=np.int64)
    pred = None
    rec = {"start": start, "box": None if box is None else box.tolist(), "voxels": int(gt.sum()), "dsc": [],
           "nsd": [], "seconds": [], "peak_mb": [], "cuda_peak_mb": [], "clicks": [], "no_click": [], "errors": [],
           "first_click": None if box is not None else [int(v) for v in points[0]]}
    if corrections == "strokes":
        rec.update({"corrections": "strokes", "strokes": []})
        painted = {True: np.zeros(gt.shape, dtype=bool), False: np.zeros(gt.shape, dtype=bool)}
        start_points, start_labels = points, plabels
    for step in range(n_clicks + 1):
        if step > 0:
            click = next_click(pred, gt, rng) if corrections == "clicks" else next_stroke(pred, gt, rng, spacing)
            if click is None:  # perfect already: no click, nothing to run, scores carry over
                rec["no_click"].append(step)
                rec["clicks"].append(None)
                for k in ("dsc", "nsd"):
                    rec[k].append(rec[k][-1])
                rec["seconds"].append(None)
                rec["peak_mb"].append(None)
                rec["cuda_peak_mb"].append(None)
                continue
            pt, is_fg = click
            if corrections == "clicks":
                points = np.concatenate([points, pt[None].astype(np.int64)])
                plabels = np.concatenate([plabels, [1 if is_fg else 0]])
            else:  # every stroke so far -> points, as the server converts a stroke volume
                painted[is_fg][tuple(pt.T)] = True
                sp = prompts_from_masks(painted[True], painted[False], spacing)
                points = np.concatenate([start_points, sp.points])
                plabels = np.concatenate([start_labels, sp.point_labels])
                rec["strokes"].append({"voxels": len(pt), "foreground": bool(is_fg), "points": len(sp.points),
                                       "ends": [[int(v) for v in pt[0]], [int(v) for v in pt[-1]]]})
                pt = pt[len(pt) // 2]  # recorded as the step's click: the stroke's middle voxel
            rec["clicks"].append([int(v) for v in pt] + [int(is_fg)])
        torch_mod = _cuda_peak_reset()
        meter = _PeakRSS() if measure_memory else None
        t0 = time.perf_counter()
        try:
            if meter is not None:
                with meter:
                    out = method.predict(image, affine, [b.copy() for b in boxes], points.copy(), plabels.copy(),
                                         None if pred is None else pred.copy())
            else:
                out = method.predict(image, affine, [b.copy() for b in boxes], points.copy(), plabels.copy(),
                                     None if pred is None else pred.copy())
            out = np.asarray(out)
            if out.shape != gt.shape:
                raise ValueError(f"prediction shape {out.shape} != image shape {gt.shape}")
            out = (out != 0).astype(np.uint8)
        except Exception as e:  # a failing step scores 0 and the protocol goes on
            logger.warning("%s failed at step %d: %s", getattr(method, "name", method), step, e)
            rec["errors"].append(f"step {step}: {type(e).__name__}: {e}")
            out = np.zeros(gt.shape, dtype=np.uint8)
        dt = time.perf_counter() - t0
        pred = out
        d = dice(pred, gt)
        rec["dsc"].append(d)
        rec["nsd"].append(protocol_nsd(pred, gt, spacing, dsc=d, tolerance=tolerance_mm))
        rec["seconds"].append(dt)
        rec["peak_mb"].append(meter.peak_mb if meter is not None else None)
        rec["cuda_peak_mb"].append(torch_mod.cuda.max_memory_allocated() / 2 ** 20 if torch_mod else None)
    rec["box_dsc"] = rec["dsc"][0]
    rec["box_nsd"] = rec["nsd"][0]
    rec["dsc_auc"] = auc(rec["dsc"][1:])
    rec["nsd_auc"] = auc(rec["nsd"][1:])
    rec["final_dsc"] = rec["dsc"][-1]
    rec["final_nsd"] = rec["nsd"][-1]
    times = [t for t in rec["seconds"] if t is not None]
    rec["seconds_total"] = float(sum(times))
    rec["seconds_per_step"] = float(np.mean(times)) if times else 0.0
    mems = [m for m in rec["peak_mb"] if m is not None]
    rec["peak_mb_max"] = float(max(mems)) if mems else None
    rec["over_budget"] = rec["seconds_total"] > PROTOCOL["time_budget_s"]
    return rec


def _structure_ids(case: Case, labels: np.ndarray, max_structures: Optional[int]) -> List[int]:
    present = set(int(v) for v in np.unique(labels) if v != 0)
    present |= {u for u, members in case.unions.items() if members and set(members) <= present}
    ids = sorted(i for i in (case.labels or {i: "" for i in present}) if i in present)
    if max_structures is not None and max_structures > 0:
        ids = ids[:max_structures]
    return ids


def evaluate(methods: Sequence, data_dir, seed: int = 0, n_clicks: int = 5, jitter: int = 3,
             max_structures: Optional[int] = None, cases: Optional[Sequence[str]] = None,
             progress: bool = True, measure_memory: bool = True,
             log: Callable[[str], None] = print, starts: Sequence[str] = ("box",),
             corrections: Sequence[str] = ("clicks",)) -> dict:
    """Evaluate ``methods`` on every labelled structure of the dataset (``max_structures``: at most that many per
    image, the lowest label ids) under each start protocol of ``starts`` ("box", "click") and each kind of
    correction of ``corrections`` ("clicks", "strokes"); results are keyed ``run_name(method, start,
    correction)``. Returns the results dictionary written by :func:`write_results`."""
    cases_ = load_dataset(data_dir, cases)
    bad = [s for s in starts if s not in STARTS]
    if bad or not starts:
        raise ValueError(f"starts must be among {STARTS}, got {list(starts)}")
    bad = [c for c in corrections if c not in CORRECTIONS]
    if bad or not corrections:
        raise ValueError(f"corrections must be among {CORRECTIONS}, got {list(corrections)}")
    runs = [(m, st, co) for co in corrections for st in starts for m in methods]
    per_method: Dict[str, List[dict]] = {run_name(m.name, st, co): [] for m, st, co in runs}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for case in cases_:
        image, affine, labels = _load(case)
        ids = _structure_ids(case, labels, max_structures)
        log(f"{case.name}: {image.shape} spacing {np.round(spacing_from_affine(affine), 3).tolist()}, "
            f"{len(ids)} structures")
        for m, st, co in runs:
            key = run_name(m.name, st, co)
            if hasattr(m, "new_run"):
                m.new_run()
            it = ids
            if progress and tqdm is not None:
                it = tqdm(ids, desc=f"{key} / {case.name}", leave=False)
            for lid in it:
                gt = structure_mask(labels, lid, case.unions)
                rec = evaluate_structure(m, image, affine, gt, _structure_seed(seed, case.name, lid),
                                         n_clicks=n_clicks, jitter=jitter, measure_memory=measure_memory, start=st,
                                         corrections=co)
                rec.update({"case": case.name, "modality": case.modality, "label": int(lid),
                            "name": case.labels.get(lid, f"label_{lid}")})
                per_method[key].append(rec)
            s = summarize([r for r in per_method[key] if r["case"] == case.name])
            log(f"  {key:15s} first DSC {s['box_dsc']:.3f}  DSC_AUC {s['dsc_auc']:.3f}  NSD_AUC {s['nsd_auc']:.3f}  "
                f"final DSC {s['final_dsc']:.3f}  final NSD {s['final_nsd']:.3f}  {s['seconds_per_step']:.2f} s/step")
    results = {
        "protocol": {**PROTOCOL, "clicks": n_clicks, "jitter_voxels": jitter, "seed": seed, "starts": list(starts)},
        "data": str(data_dir),
        "machine": machine_info(),
        "methods": {},
    }
    if list(corrections) != ["clicks"]:
        results["protocol"].update({"corrections": list(corrections), "stroke_rule": STROKE_RULE})
    for name, recs in per_method.items():
        by_case = {c.name: summarize([r for r in recs if r["case"] == c.name]) for c in cases_}
        results["methods"][name] = {"overall": summarize(recs), "by_case": by_case, "structures": recs}
    return results
