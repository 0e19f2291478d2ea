"""The interaction-unrolled training step and the validation measure, shared by ``pretrain`` and ``finetune``.

One prompted sample (same geometry as :class:`lib.engine.EnsamEngine`):

1. a jittered box from :func:`lib.prompts.simulation.box_from_mask` (with probability ``p_no_box`` a single
   foreground click inside the object instead);
2. the ROI from :func:`lib.geometry.choose_roi` (sometimes enlarged / shifted, as AutoZoom and reused cached ROIs
   do), the image through :func:`lib.geometry.crop_to_model`, the target through ``mask_to_model(...) > 0.5``;
3. ``net.encode`` ONCE (with gradient), then ``net.decode`` for step 0 and K more steps (K uniform in
   0..``max_clicks``); each step adds the click of :func:`lib.prompts.simulation.next_click` computed on the model
   grid from the previous (binary, detached) prediction, which is also passed as the dense ``prev_mask``; with
   ``p_stroke`` > 0 (off by default) a step is, with that probability, a stroke instead
   (:func:`lib.prompts.simulation.next_stroke`, points along it by :func:`lib.prompts.strokes.stroke_points`);
4. loss = mean over steps of (soft Dice + BCE).

Training a refiner (``lib.weights``: the weights that answer the steps starting from a previous mask): with a
``first_net`` (the frozen main weights the refiner will be paired with), step 0 is that network's answer (no
gradient, no loss) and the trained network decodes K >= 1 corrective steps from it, so it learns to correct the
first answers it will meet in the engine rather than its own (stop 22: a refiner trained on its own previous masks
corrected another network's answers worse on some structures).

A concept sample (probability ``p_concept``) has no prompts: a fixed-spacing window and the structure's label id
(the prompt-free ``segment_label`` mode).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..contract import Contract
from ..engine import bf16_ok
from ..evaluation.metrics import dice as dice_np  # THE Dice, under its old name here
from ..evaluation.report import HARM_DSC
from ..geometry import (Roi, RoiPolicy, bbox_edge_mm, choose_roi, crop_to_model, logits_to_original, mask_bbox,
                        mask_to_model, normalize_intensity)
from ..network import BG, BOX_MAX, BOX_MIN, FG, dense_prompt_maps
from ..prompts.simulation import box_from_mask, next_click, next_stroke
from ..prompts.strokes import stroke_points
from .data.augmentation import region_around
from .data.volumes import norm01

__all__ = ["LoopConfig", "Case", "bf16_ok", "prompted_case", "box_cases", "refine_case", "concept_case", "kept_region",
           "unrolled_loss", "device_type", "train_step", "evaluate", "dice_np"]


@dataclass
class LoopConfig:
    max_clicks: int = 4            # K ~ U{0..max_clicks} corrective clicks after the first prompt
    p_no_box: float = 0.2          # first prompt = one foreground click instead of a box
    p_concept: float = 0.15        # prompt-free label-token samples
    box_jitter: int = 5            # box sides move outward by U{0..jitter'} voxels, jitter' ~ U{0..box_jitter}
    p_roi_jitter: float = 0.3      # ROI enlarged x U(1, 1.5) and shifted (AutoZoom, reused ROIs)
    bce_weight: float = 0.3        # recipe v2: with 1.0, in-box probabilities stayed < 0.5 (DSC 0) early on
    dice_weight: float = 1.0
    click_extent_scale: tuple = (1.0, 1.0)  # the view around a lone first click = the contract's click_extent_mm
                                            # x U(lo, hi) (recipe v3: several scales, so a click on a large organ
                                            # fills the view and AutoZoom grows it)
    click_view_object: tuple = ()  # (lo, hi): the view around a lone first click = the object's largest extent x
                                   # log-U(lo, hi) instead (recipe v8: the answer to a click must be the object
                                   # under it, whatever share of the view it fills); () = the contract's view
    p_click_view_object: float = 1.0  # share of lone-click samples that take the object-relative view (recipe v9:
                                      # the rest keep the contract's view, the one the engine opens); 1.0 = all
    error_weight: float = 0.0      # extra BCE on the voxels the previous step got wrong (corrective steps only):
                                   # the click must flip them (recipe v3)
    p_refine: float = 0.0          # box cases turned into a native-resolution refinement window (the engine's
                                   # second stage): a window refine_zoom x finer than the box's ROI on the coarse
                                   # mask's boundary, that coarse mask as the previous mask (recipe v3)
    refine_zoom: tuple = (2.0, 4.0)  # U(lo, hi): how much finer the window is than the coarse ROI
    p_stroke: float = 0.0          # a corrective step is a stroke instead of a click (issue 12: ensam_scribbles):
                                   # next_stroke on the model grid, points along it every stroke_step model voxels
                                   # (at most stroke_points); 0 = clicks only, the recipe's rng draws unchanged
    stroke_step: float = 3.0
    stroke_points: int = 24
    change_weight: float = 0.0     # issue 27: a corrective step pays for what it changes far from its prompt where
                                   # the previous answer was right: change_weight x (soft voxels changed there) /
                                   # (object + previous answer sizes); 0 = off, the loss unchanged
    change_reach: float = 1.0      # "far" = beyond change_reach x the object's equivalent-sphere radius from every
    change_reach_min: float = 4.0  # point of the new prompt, and at least change_reach_min model voxels
    change_boxed_only: bool = False  # the penalty only in sessions whose first prompt was a box: from a lone click the
                                     # first answer is a small part of the object and most of the needed change is
                                     # far from the click (recipe v17's step 1320 with the penalty everywhere lost
                                     # 0.20 click-start DSC_AUC on the tuning split's largest third; HISTORY)
    contract: Contract = field(default_factory=Contract)  # shared with the engine (lib.contract): ROI policy,
                                                          # model grid, click maps, intensities

    def policy(self, click_extent_scale: float = 1.0) -> RoiPolicy:
        """The contract's ROI policy, with the view around a lone click scaled (training augmentation)."""
        roi = self.contract.roi
        return replace(roi, click_extent_mm=roi.click_extent_mm * float(click_extent_scale))

    def __post_init__(self):
        if self.p_refine > 0 and not self.contract.refine:
            raise ValueError("p_refine > 0 trains the engine's refinement stage: the contract must say refine: true")

    @classmethod
    def on_grid(cls, model_shape, **kw) -> "LoopConfig":
        """A loop with the default contract on another model grid (small test networks)."""
        refine = kw.get("p_refine", 0) > 0
        return cls(contract=Contract(roi=RoiPolicy(model_shape=tuple(int(s) for s in model_shape)), refine=refine),
                   **kw)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Case:
    """One model-grid training / validation case."""

    image: torch.Tensor                 # (1, 1, D, H, W) normalised
    gt: np.ndarray                      # (D, H, W) bool
    points: np.ndarray                  # (N, 3) model-grid float
    types: np.ndarray                   # (N,) int (FG/BG/BOX_MIN/BOX_MAX)
    label_id: Optional[int] = None      # concept token (prompt-free cases)
    kind: str = ""
    name: str = ""
    seed: int = 0                       # for deterministic click tie-breaking in validation
    prev: Optional[np.ndarray] = None   # (D, H, W) bool previous mask at step 0 (refinement cases)


def _fg_click(mask: np.ndarray, rng) -> np.ndarray:
    """A user's first click inside the object: the deepest point (half the time) or a random interior voxel."""
    if rng.random() < 0.5:
        res = next_click(None, mask, rng)
        if res is not None:
            return res[0]
    idx = np.flatnonzero(mask)
    return np.asarray(np.unravel_index(idx[rng.integers(idx.size)], mask.shape))


def object_relative_view(mask: np.ndarray, spacing, scale, rng, min_mm: float, max_mm: float = 320.0) -> float:
    """A lone click's view (mm) drawn relative to the object: its largest bounding-box edge (mm) x a log-uniform
    factor in ``scale`` = (lo, hi), within [``min_mm``, ``max_mm``]."""
    edge = bbox_edge_mm(mask_bbox(mask), spacing)
    lo, hi = (float(v) for v in scale)
    return float(np.clip(edge * np.exp(rng.uniform(np.log(lo), np.log(max(hi, lo)))), min_mm, max_mm))


def prompted_case(image: np.ndarray, mask: np.ndarray, spacing, rng, cfg: LoopConfig = LoopConfig(),
                  use_box: Optional[bool] = None, roi_jitter: Optional[bool] = None, kind: str = "",
                  name: str = "") -> Optional[Case]:
    """Original-grid (image, mask, spacing) -> model-grid :class:`Case` with the first prompt (box or click).
    None if the object does not survive the crop."""
    if use_box is None:
        use_box = rng.random() >= cfg.p_no_box
    shape = image.shape
    lo_s, hi_s = (float(v) for v in cfg.click_extent_scale)
    policy = cfg.policy(lo_s if hi_s <= lo_s else float(rng.uniform(lo_s, hi_s)))
    if use_box:
        box = box_from_mask(mask, jitter=int(rng.integers(0, cfg.box_jitter + 1)), rng=rng)
        roi = choose_roi(shape, spacing, boxes=box[None], policy=policy)
    else:
        click = _fg_click(mask, rng)
        if cfg.click_view_object and (cfg.p_click_view_object >= 1.0 or rng.random() < cfg.p_click_view_object):
            policy = replace(policy, click_extent_mm=object_relative_view(mask, spacing, cfg.click_view_object, rng,
                                                                          policy.min_extent_mm))
        roi = choose_roi(shape, spacing, fg_points=click[None].astype(float), policy=policy)
    if use_box and cfg.p_refine > 0 and rng.random() < cfg.p_refine:
        case = refine_case(image, mask, roi, box, rng, cfg, kind=kind, name=name)
        if case is not None:
            return case
    if roi_jitter is None:
        roi_jitter = rng.random() < cfg.p_roi_jitter
    if roi_jitter:
        big = roi.enlarged(float(rng.uniform(1.0, 1.5)))
        slack = (np.asarray(big.size) - np.asarray(roi.size)) // 2
        shift = np.round(rng.uniform(-1, 1, 3) * slack).astype(int)
        roi = Roi(tuple(int(s) for s in np.asarray(big.start) + shift), big.size, big.model_shape)
    x = crop_to_model(image, roi)[None]                       # (1, 1, D, H, W)
    gt = (mask_to_model(mask, roi)[0] > 0.5).numpy()
    if gt.sum() < 4:
        return None
    if use_box:
        mb = roi.boxes_to_model(box[None])[0]
        pts = np.stack([mb[0::2], mb[1::2]])
        types = np.array([BOX_MIN, BOX_MAX])
    else:
        pts = roi.to_model(click[None])
        types = np.array([FG])
        if not gt[tuple(np.clip(np.round(pts[0]).astype(int), 0, np.asarray(gt.shape) - 1))]:
            # the click fell just off the object after resizing: use the model-grid deepest point instead
            res = next_click(None, gt, rng)
            pts = res[0][None].astype(float)
    return Case(x.float(), gt, pts.astype(np.float32), types.astype(np.int64), None, kind, name)


def box_cases(volumes, cfg: Optional["LoopConfig"] = None, seed: int = 1234, labels: Optional[Sequence[int]] = None):
    """One deterministic box-prompted model-grid case per structure of each of ``volumes`` (``Volume``; only the
    label values ``labels`` when given), no augmentation: the validation cases of fine-tuning and the
    reference cases of :mod:`lib.training.reference_guard` (``volumes`` from :mod:`lib.training.data`)."""
    cfg = cfg or LoopConfig()
    rng = np.random.default_rng(seed)
    out = []
    for v in volumes:
        for lab, sl in v.bboxes.items():
            if labels is not None and lab not in labels:
                continue
            lo = [s.start for s in sl]
            hi = [s.stop - 1 for s in sl]
            region = region_around(v.image.shape, lo, hi, v.spacing, rng)
            m = v.labels[region] == lab
            if not m.any():  # a bounding box without voxels of its own value (an atlas's union region)
                continue
            c = prompted_case(norm01(v.image[region], v.lo, v.hi), m, v.spacing, rng, cfg, use_box=True,
                              roi_jitter=False, kind="val", name=f"{v.name}:{lab}")
            if c is not None:
                c.seed = int(rng.integers(2 ** 31))
                out.append(c)
    return out


def refine_case(image: np.ndarray, mask: np.ndarray, coarse_roi: Roi, box: np.ndarray, rng, cfg: LoopConfig,
                kind: str = "", name: str = "") -> Optional[Case]:
    """A native-resolution refinement case, as :meth:`lib.engine.EnsamEngine._refine` builds it: the object seen
    through the coarse ROI's model grid (the best a coarse pass can do, randomly grown or shrunk by a voxel) is
    the previous mask of a window ``U(cfg.refine_zoom)`` times finer (never finer than the image), centred on a
    random voxel of that coarse mask's boundary; the box stays the prompt. None when the coarse grid is not
    coarser than the image (nothing to refine) or the window misses the object."""
    if coarse_roi.voxels_per_model_voxel.max() <= 1.5:
        return None
    shape = mask.shape
    coarse = logits_to_original(mask_to_model(mask, coarse_roi)[0] - 0.5, coarse_roi, shape).astype(bool)
    r = rng.random()
    if r < 0.25:
        coarse = ndimage.binary_dilation(coarse)
    elif r < 0.5:
        coarse = ndimage.binary_erosion(coarse)
    band = np.argwhere(coarse ^ ndimage.binary_erosion(coarse))
    if not len(band):
        return None
    win = coarse_roi.finer_window(band[rng.integers(len(band))], float(rng.uniform(*cfg.refine_zoom)))
    gt = (mask_to_model(mask, win)[0] > 0.5).numpy()
    if gt.sum() < 4 or gt.all():
        return None
    prev = (mask_to_model(coarse, win)[0] > 0.5).numpy()
    mb = win.boxes_to_model(box[None])[0]
    pts = np.stack([mb[0::2], mb[1::2]])
    x = crop_to_model(image, win)[None]
    return Case(x.float(), gt, pts.astype(np.float32), np.array([BOX_MIN, BOX_MAX], np.int64), None,
                kind or "refine", name, prev=prev)


def concept_case(window: np.ndarray, mask: np.ndarray, label_id: int, kind: str = "concept",
                 name: str = "") -> Case:
    """A prompt-free case: a model-size window (already at the working spacing), normalised like the engine's
    sliding window (``normalize_intensity`` per window)."""
    x = normalize_intensity(torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))[None])
    return Case(torch.as_tensor(x, dtype=torch.float32)[None], mask.astype(bool), np.zeros((0, 3), np.float32),
                np.zeros(0, np.int64), int(label_id), kind, name)


def kept_region(prev: np.ndarray, gt: np.ndarray, new_points: np.ndarray, cfg: LoopConfig) -> np.ndarray:
    """(D, H, W) bool: where a corrective step should leave the previous answer alone: the previous answer was
    right there and every point of the new prompt (model grid, (n, 3)) is farther than ``cfg.change_reach`` x the
    object's equivalent-sphere radius (at least ``cfg.change_reach_min`` voxels)."""
    radius = (3.0 * float(gt.sum()) / (4.0 * np.pi)) ** (1.0 / 3.0)
    reach = max(cfg.change_reach_min, cfg.change_reach * radius)
    grid = np.indices(gt.shape, dtype=np.float32).reshape(3, -1).T          # (V, 3)
    d2 = ((grid[:, None, :] - np.asarray(new_points, np.float32)[None]) ** 2).sum(-1).min(1)
    return (prev == gt) & (d2.reshape(gt.shape) > reach * reach)


def _loss(logits: torch.Tensor, target: torch.Tensor, cfg: LoopConfig,
          prev_error: Optional[torch.Tensor] = None, keep: Optional[tuple] = None) -> torch.Tensor:
    """Soft Dice + BCE; with ``prev_error`` (voxels the previous step got wrong) and ``cfg.error_weight``, plus
    the mean BCE over those voxels (a corrective click that leaves them wrong costs more); with ``keep`` =
    (kept voxels (1, 1, D, H, W) bool, previous answer (1, 1, D, H, W) float) and ``cfg.change_weight``, plus the
    soft volume changed in the kept region over the object's and the previous answer's sizes (:func:`kept_region`)."""
    logits = logits.float()
    bce_map = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = bce_map.mean()
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1.0) / (p.sum() + target.sum() + 1.0)
    loss = cfg.bce_weight * bce + cfg.dice_weight * dice
    if prev_error is not None and cfg.error_weight > 0 and prev_error.any():
        loss = loss + cfg.error_weight * bce_map[prev_error].mean()
    if keep is not None and cfg.change_weight > 0:
        kept, prev = keep
        changed = ((p - prev).abs() * kept).sum()
        loss = loss + cfg.change_weight * changed / (target.sum() + prev.sum() + 1.0)
    return loss


def _decode(net, feats, pts, types, prev, label_id, device, sigma: float):
    p = torch.as_tensor(pts, dtype=torch.float32, device=device)[None]
    t = torch.as_tensor(types, dtype=torch.long, device=device)[None]
    shape = tuple(feats[0].shape[2:])
    dense = dense_prompt_maps(p, t, shape, prev, sigma=sigma)
    lab = None if label_id is None else torch.tensor([label_id], device=device)
    return net.decode(feats, p, t, dense, lab)


@torch.no_grad()
def _first_answer(first_net, case: Case, device, cfg: LoopConfig) -> np.ndarray:
    """``first_net``'s binary answer (model grid) to the case's first prompt."""
    was = first_net.training
    first_net.eval()
    feats = first_net.encode(case.image.to(device))
    logits = _decode(first_net, feats, case.points, case.types, None, case.label_id, device, cfg.contract.click_sigma)
    first_net.train(was)
    return (logits.float()[0, 0] > 0).cpu().numpy()


def unrolled_loss(net, case: Case, n_clicks: int, rng, cfg: LoopConfig = LoopConfig(), device="cpu",
                  amp: bool = False, first_net=None):
    """Encode once, decode 1 + ``n_clicks`` times (each click from the previous detached prediction).
    With ``first_net`` (a prompted case without a previous mask and ``n_clicks`` >= 1), step 0 is ``first_net``'s
    answer, which only supplies the first correction and the previous mask; the loss is over the corrective steps.
    Returns (mean loss tensor, per-step DSC list)."""
    x = case.image.to(device)
    target = torch.as_tensor(case.gt, dtype=torch.float32, device=device)[None, None]
    pts, types = case.points.copy(), case.types.copy()
    prev = None if case.prev is None else torch.as_tensor(case.prev, dtype=torch.float32, device=device)[None, None]
    prev_error = None
    keep = None
    losses, dices = [], []
    # bf16 autocast: on CUDA, and on CPUs with bf16 units (AVX512-BF16 / AMX; pretrain's ``cpu_bf16``): a 64^3
    # training step (encode + 3 decodes + backward, 1 thread, AMD EPYC with avx512_bf16) took 2.0 s against 4.4 s
    # in fp32 (min of 3; runs/bench_step.py)
    first = 0
    with torch.autocast(device_type=device_type(device), dtype=torch.bfloat16, enabled=amp):
        if first_net is not None and case.label_id is None and case.prev is None and n_clicks >= 1:
            pred = _first_answer(first_net, case, device, cfg)
            correction = _correction(pred, case.gt, rng, cfg)
            if correction is not None:  # else the first answer is perfect: train the network's own step 0
                dices.append(dice_np(pred, case.gt))
                pts, types = _add_correction(pts, types, correction)
                prev = torch.as_tensor(pred, dtype=torch.float32, device=device)[None, None]
                prev_error = torch.as_tensor(pred != case.gt, device=device)[None, None]
                keep = _keep(pred, case.gt, correction, prev, cfg, case.types)
                first = 1
        feats = net.encode(x)
        for step in range(first, n_clicks + 1):
            logits = _decode(net, feats, pts, types, prev, case.label_id, device, cfg.contract.click_sigma)
            losses.append(_loss(logits, target, cfg, prev_error, keep))
            pred = (logits.detach()[0, 0] > 0).cpu().numpy()
            prev_error = torch.as_tensor(pred != case.gt, device=device)[None, None]
            dices.append(dice_np(pred, case.gt))
            if step == n_clicks or case.label_id is not None:
                break
            correction = _correction(pred, case.gt, rng, cfg)
            if correction is None:
                break
            pts, types = _add_correction(pts, types, correction)
            prev = torch.as_tensor(pred, dtype=torch.float32, device=device)[None, None]
            keep = _keep(pred, case.gt, correction, prev, cfg, case.types)
    return torch.stack(losses).mean(), dices


def _keep(pred: np.ndarray, gt: np.ndarray, correction, prev: torch.Tensor, cfg: LoopConfig,
          first_types: Optional[np.ndarray] = None):
    """The ``keep`` argument of :func:`_loss` for the step answering ``correction`` (None when the penalty is off,
    or with ``cfg.change_boxed_only`` when the session's first prompt ``first_types`` holds no box)."""
    if cfg.change_weight <= 0:
        return None
    if cfg.change_boxed_only and not np.isin(np.asarray(first_types if first_types is not None else []),
                                             (BOX_MIN, BOX_MAX)).any():
        return None
    kept = torch.as_tensor(kept_region(pred, gt, correction[0], cfg), device=prev.device)[None, None]
    return kept, prev


def _add_correction(pts: np.ndarray, types: np.ndarray, correction):
    """(points, types) with the corrective prompt of :func:`_correction` appended."""
    new_pts, is_fg = correction
    return (np.concatenate([pts, new_pts.astype(np.float32)]),
            np.concatenate([types, np.full(len(new_pts), FG if is_fg else BG)]))


def _correction(pred: np.ndarray, gt: np.ndarray, rng, cfg: LoopConfig):
    """The next corrective prompt on the model grid, ``(points (n, 3), is_foreground)``, or None when ``pred`` is
    perfect: one click, or (probability ``cfg.p_stroke``, drawn only when it is > 0) points along a stroke."""
    if cfg.p_stroke > 0 and rng.random() < cfg.p_stroke:
        stroke = next_stroke(pred, gt, rng)
        if stroke is None:
            return None
        painted = np.zeros(gt.shape, dtype=bool)
        painted[tuple(stroke[0].T)] = True
        return stroke_points(painted, step_mm=cfg.stroke_step, max_points=cfg.stroke_points), stroke[1]
    click = next_click(pred, gt, rng)
    return None if click is None else (click[0][None], click[1])


def device_type(device) -> str:
    """The autocast device type of ``device`` ("cuda" or "cpu")."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


@torch.no_grad()
def evaluate(net, cases: Sequence[Case], n_clicks: int = 2, device="cpu",
             cfg: LoopConfig = LoopConfig(), first_net=None, amp: bool = False) -> Dict[str, float]:
    """Box-only DSC (step 0) and DSC after ``n_clicks`` corrective clicks, averaged over the cases, and the share
    of corrective steps that lowered the DSC by more than ``HARM_DSC[0]`` (``val_harmful``)
    (model grid; click ties broken with each case's seed). Cases that start from one foreground click count their
    step 0 in ``val_oneclick_dsc`` (and their last step in the click average); prompt-free cases in
    ``val_concept_dsc``. With ``first_net`` (training a refiner), step 0 of the prompted cases is that network's
    answer and the corrective steps ``net``'s, as the engine pairs them. ``amp``: in bf16 autocast, as
    :func:`train_step` trains (default float32)."""
    was = net.training
    net.eval()
    first, last, concept, oneclick = [], [], [], []
    steps = harmful = 0
    with torch.autocast(device_type=device_type(device), dtype=torch.bfloat16, enabled=amp):
        for c in cases:
            feats = net.encode(c.image.to(device))
            if c.label_id is not None:
                logits = _decode(net, feats, c.points, c.types, None, c.label_id, device, cfg.contract.click_sigma)
                concept.append(dice_np((logits[0, 0] > 0).cpu().numpy(), c.gt))
                continue
            rng = np.random.default_rng(c.seed)
            pts, types, prev = c.points.copy(), c.types.copy(), None
            for step in range(n_clicks + 1):
                if step == 0 and first_net is not None and c.prev is None:
                    pred = _first_answer(first_net, c, device, cfg)
                else:
                    logits = _decode(net, feats, pts, types, prev, None, device, cfg.contract.click_sigma)
                    pred = (logits[0, 0] > 0).cpu().numpy()
                dsc = dice_np(pred, c.gt)
                if step == 0:
                    (oneclick if c.types.tolist() == [FG] else first).append(dsc)
                else:
                    steps += 1
                    harmful += int(dsc < before - HARM_DSC[0])
                before = dsc
                click = next_click(pred, c.gt, rng) if step < n_clicks else None
                if click is None:
                    break
                pts = np.concatenate([pts, click[0][None].astype(np.float32)])
                types = np.concatenate([types, [FG if click[1] else BG]])
                prev = torch.as_tensor(pred, dtype=torch.float32, device=device)[None, None]
            last.append(dice_np(pred, c.gt))
    net.train(was)
    out = {"val_box_dsc": float(np.mean(first)) if first else float("nan"),
           f"val_click{n_clicks}_dsc": float(np.mean(last)) if last else float("nan")}
    if concept:
        out["val_concept_dsc"] = float(np.mean(concept))
    if oneclick:
        out["val_oneclick_dsc"] = float(np.mean(oneclick))
    if steps:
        out["val_harmful"] = harmful / steps
    return out


def train_step(net, opt, case: Case, rng, cfg: LoopConfig = LoopConfig(), device="cpu", amp: bool = False,
               grad_clip: float = 1.0, grad_hook=None, first_net=None):
    """One optimiser step on one case (K ~ U{0..max_clicks} clicks for prompted cases, none for concept cases;
    with ``first_net``, K ~ U{1..max_clicks} after that network's first answer, :func:`unrolled_loss`).
    ``grad_hook(net)`` runs after ``backward`` and before clipping (data-parallel gradient averaging).
    Returns (loss, per-step DSC list)."""
    k = 0 if case.label_id is not None else int(rng.integers(0 if first_net is None else 1, cfg.max_clicks + 1))
    net.train()
    opt.zero_grad()
    loss, dices = unrolled_loss(net, case, k, rng, cfg, device, amp, first_net)
    loss.backward()
    if grad_hook is not None:
        grad_hook(net)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    return float(loss.detach()), dices
