"""EnsamEngine: whole-volume interactive inference with an encoding cache, and prompt-free label segmentation.

All prompt geometry goes through :mod:`lib.geometry`. Typical use::

    eng = EnsamEngine(weights="apps/ensam/model/pretrained_ensam.pt")
    mask = eng.segment(image, affine, boxes=[[10, 40, 20, 60, 5, 15]])
    mask = eng.segment(image, affine, boxes=[...], points=[[25, 40, 10]], point_labels=[0], prev_mask=mask)

Weights with a refiner (``lib.weights``: a second set of weights of the same network and contract) answer the
steps that start from a previous mask with the refiner and everything else (a first box or click, prompt-free
segmentation, the lone-click probe) with the main weights; ``last_info["weights"]`` says which answered.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

try:
    import cc3d
except ImportError:  # pragma: no cover - cc3d is a dependency of the app
    cc3d = None

from .cache import ByteLRU
from .click_scale import LoneClickView
from .correction import conservative_merge
from .contract import Contract, check_same, contract_for_network, read_contract
from .geometry import (PromptError, Prompts, Roi, bbox_edge_mm, check_prompts, choose_roi, crop_to_model,
                       flip_model_boxes, flip_model_points, logits_to_original, mask_bbox, mask_to_model,
                       normalize_intensity, prompt_extent, spacing_from_affine)
from .graphcut import BoundaryCut
from .network import BG, BOX_MAX, BOX_MIN, FG, EnsamNet, NetworkConfig, build_network, dense_prompt_maps
from .weights import Artefact, load_artefact

__all__ = ["EngineConfig", "EnsamEngine", "PromptError", "load_network", "image_fingerprint", "bf16_ok"]

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Inference-only settings (what the network learned under, ROI policy, click maps, intensities, label
    spacing, is the weights' :class:`lib.contract.Contract`, not a setting). ``max_zoom``: how many times the ROI
    may grow by ``zoom_factor`` when the mask touches its border (AutoZoom; only without a box, which bounds the
    object: with one, each zoom re-encoded a larger ROI for a mask leaking past the box's margin);
    ``cache_bytes``: bound of the encoding cache; ``label_overlap``: sliding-window overlap of prompt-free
    segmentation. ``bf16``: run the network under bf16 autocast: "auto" (where :func:`bf16_ok`: CUDA, CPUs with
    AVX512-BF16/AMX), "on", "off".
    ``local_edits``: a corrective step changes the previous mask only in the connected regions of change that
    reach the latest click (VISTA3D's rule); elsewhere the previous mask stays.
    ``tta_flips``: test-time augmentation of the interactive path: each entry is a set of model-grid axes, e.g.
    ``((0,), (1,))``; the ROI is also encoded flipped along them (each view cached like the plain one), decoded
    with the prompts flipped the same way, and the logits of all views (the plain one included) averaged.

    Native-resolution refinement (AutoZoom's second half; only with weights whose contract says they were trained
    for it, ``Contract.refine``): when one model voxel of the ROI spans more than
    ``refine_factor`` scan voxels, up to ``refine_windows`` windows (``refine_windows_click`` for a corrective
    step) of the model size, ``refine_zoom`` times finer than the ROI (never finer than the scan), are placed on
    the new boundary (the latest click's first) and re-predicted with the coarse mask as the previous mask and the
    prompts inside them; each is written back inside, ``refine_margin`` fine voxels from its faces.
    ``keep_fine_prev``: with a previous mask, the coarse pass changes it only where the network's coarse decision
    changed (where the new coarse mask differs from the previous mask seen on the model grid), so boundary detail
    already refined, or drawn by the user, survives corrective clicks elsewhere. Off: on the tuning split
    (``lib.evaluation.splits``, release 6) every average within +0.021 / -0.001 of off, inside the noise.

    ``boundary_cut``: a :class:`lib.graphcut.BoundaryCut` (or its settings as a dict; None = off) run on each
    answer after the network, on the scan's own grid: the network's mask as a soft prior, an intensity model, the
    clicks as hard seeds, the box as a bound. On: without it the tuning split is lower on all ten averages of the
    two protocols (release 6, box start: DSC_AUC 2.527 -> 2.490, final NSD 0.699 -> 0.642).
    ``lone_click_view``: a :class:`lib.click_scale.LoneClickView` (or its settings as a dict; None = off) that sizes
    the view around a lone first click (no box, no previous mask) from how far the tissue under it extends, in
    place of the contract's fixed ``click_extent_mm``. Off: on the tuning split it raises the first click's DSC
    (0.340 -> 0.430) but lowers NSD_AUC (2.337 -> 2.303) and the final DSC (0.670 -> 0.663).
    (Every setting's figures, both sets: model card, "Engine settings decided on the tuning split".)
    ``lone_click_probe``: ``(probe_mm, scale[, rounds])`` or () (off): the view around a lone first click is sized
    by the network itself: a pass in a ``probe_mm`` view, then the answer's largest extent x ``scale`` (within the
    contract's minimum ROI edge and the previous view) is the next view, ``rounds`` times (default 1; a round whose
    view would not shrink by 10 % ends them), then the real pass (AutoZoom as usual). For weights trained on
    object-relative lone-click views (recipe v8, ``LoopConfig.click_view_object``), which answer a click with the
    object under it at any share of the view; one more encoding per round, on the first click only.
    ``refiner_warm``: with weights that carry a refiner, the first prompt's ROI is also encoded by the refiner
    (cached), so the corrective clicks that follow, which reuse that ROI, cost a decode, not an encode: the first
    interaction pays one more encoding instead.
    ``multimask``: with weights whose network has a multi-mask head (``NetworkConfig.n_masks`` > 1,
    :class:`lib.network.mask_head.MultiMaskHead`), a lone first click (no box, no previous mask) is answered by the
    mask with the highest predicted DSC (AutoZoom then grows the view while that mask touches it); every other
    prompt by mask 0, the network's own. ``last_info["mask"]`` reports the choice.
    ``correction_reach``: ``(k, margin_mm[, mode])`` or () (off): a corrective step changes the previous answer only
    near the clicks the previous answer contradicts, balls of radius k x the click's distance to the previous
    answer's boundary + margin_mm (mode "ball": every change; "asym": removals near background clicks, additions
    connected to foreground clicks; :func:`lib.correction.conservative_merge`, issue 27); applied last, after the
    boundary cut."""

    max_zoom: int = 2
    zoom_factor: float = 1.5
    reuse_roi_growth: float = 1.6
    cache_bytes: int = 512 * 2 ** 20
    label_overlap: float = 0.25
    threshold: float = 0.0
    keep_fine_prev: bool = False
    refine_factor: float = 2.0
    refine_zoom: float = 3.0
    refine_windows: int = 2
    refine_windows_click: int = 1
    refine_margin: int = 4
    bf16: str = "auto"
    local_edits: bool = False
    tta_flips: tuple = ()
    boundary_cut: BoundaryCut | None = field(default_factory=BoundaryCut)
    lone_click_view: LoneClickView | None = None
    lone_click_probe: tuple = ()
    refiner_warm: bool = True
    correction_reach: tuple = ()
    multimask: bool = True

    def __post_init__(self) -> None:
        # one normal form (tuples of int axes: hashable cache keys), whether given as tuples or as JSON lists
        self.tta_flips = tuple(tuple(int(d) for d in f) for f in self.tta_flips)
        if isinstance(self.boundary_cut, dict):  # JSON settings (the evaluator's --engine, a config file)
            self.boundary_cut = BoundaryCut(**self.boundary_cut)
        if isinstance(self.lone_click_view, dict):
            self.lone_click_view = LoneClickView(**self.lone_click_view)


def bf16_ok(device) -> bool:
    """Whether bf16 autocast pays on ``device``: CUDA, or a CPU with bf16 units (AVX512-BF16 or AMX)."""
    if str(device).startswith("cuda"):
        return True
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def load_network(weights: str | Artefact | None = None, config: NetworkConfig | dict | None = None,
                 device: str | torch.device = "cpu") -> EnsamNet:
    """Build the network (config from ``config``, else the weights' meta, else defaults) and load its weights.
    ``weights``: a path (read with :func:`lib.weights.load_artefact`, either layout) or an artefact already read."""
    art = load_artefact(weights) if isinstance(weights, (str, os.PathLike)) else weights
    if config is None and art is not None:
        config = art.network or {}
    net = build_network(config)
    if art is not None:
        net.load_state_dict(art.state_dict)
    return net.to(device).eval()


def load_refiner(art: Artefact | None, network: EnsamNet, device: str | torch.device = "cpu") -> EnsamNet | None:
    """The corrective steps' network of ``art`` (``art.refiner``: same network as ``network``, possibly stored in
    bf16, loaded as float32), or None when the artefact has none."""
    if art is None or art.refiner is None:
        return None
    net = build_network(replace(network.config, n_masks=1))  # the multi-mask head answers first clicks only
    net.load_state_dict(art.refiner_float32())
    return net.to(device).eval()


def image_fingerprint(image: np.ndarray, affine) -> str:
    """A cheap content key for an image: shape, dtype, affine and a strided sample of the voxels."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((image.shape, str(image.dtype))).encode())
    h.update(np.asarray(affine, dtype=np.float64).tobytes())
    step = [max(1, s // 64) for s in image.shape[:3]]
    h.update(np.ascontiguousarray(image[::step[0], ::step[1], ::step[2]]).tobytes())
    return h.hexdigest()


class _EncodingCache(ByteLRU):
    """LRU of encoder features keyed by (image key, ROI, weights version, flip, encoded by the refiner), bounded in
    bytes. Thread-safe. :meth:`rois_for` lists the ROIs encoded unflipped, by either network (their geometry is
    what a corrective step reuses)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes=max_bytes, sizeof=lambda feats: sum(f.numel() * f.element_size() for f in feats))
        self.hits = 0
        self.misses = 0

    def get(self, key, default=None):
        with self._lock:
            v = super().get(key)
            if v is not None:
                self.hits += 1
            else:
                self.misses += 1
            return v if v is not None else default

    def put(self, key, feats) -> None:  # type: ignore[override]
        super().put(key, feats, replace=False)  # features of one key never change: the first stays

    def rois_for(self, image_key, version):
        return [k[1] for k in self.keys(newest_first=True) if k[0] == image_key and k[2] == version and not k[3]]


def _local_edit(prev: np.ndarray, new: np.ndarray, click, reach: int = 2) -> np.ndarray:
    """``prev`` changed only in the 26-connected regions of ``new != prev`` that come within ``reach`` voxels of
    ``click`` (region coordinates). Returns uint8."""
    diff = new.astype(bool) ^ prev.astype(bool)
    c = np.clip(np.round(click).astype(int), 0, np.asarray(diff.shape) - 1)
    near = tuple(slice(max(int(x) - reach, 0), int(x) + reach + 1) for x in c)
    if not diff[near].any():
        return prev.astype(np.uint8)
    if cc3d is not None:
        lab = cc3d.connected_components(diff.view(np.uint8), connectivity=26)
    else:  # pragma: no cover
        lab, _ = ndimage.label(diff, structure=np.ones((3, 3, 3), bool))
    ids = np.unique(lab[near])
    keep = np.isin(lab, ids[ids > 0])
    return (prev.astype(bool) ^ keep).astype(np.uint8)


class EnsamEngine:
    """Interactive and prompt-free segmentation of whole volumes with an :class:`EnsamNet`.

    Args:
        network: a built network (takes precedence), else ``weights`` (path of a plain state_dict; re-read when
            the file's mtime changes, so published fine-tuned weights are picked up) with ``network_config``.
        device: 'cpu', 'cuda', ... . config: :class:`EngineConfig`.
    """

    def __init__(self, network: EnsamNet | None = None, weights: str | None = None, device: str = "cpu",
                 config: EngineConfig | None = None, network_config: NetworkConfig | dict | None = None,
                 contract: Contract | None = None) -> None:
        self.device = torch.device(device)
        self.config = config or EngineConfig()
        self.weights = weights
        self._network_config = network_config
        self.mtime_ns = None  # exact st_mtime_ns of the weights file read: names the weights in answers, reloads
        self._version = 0
        self._lock = threading.RLock()
        self.refiner: EnsamNet | None = None  # the corrective steps' network (weights with a refiner), else None
        if network is not None:
            self.network = network.to(self.device).eval()
            self.contract = contract_for_network(self.network.config, contract)
        else:
            art = load_artefact(weights) if weights else None  # one read: weights and contract of the same file
            self.network = load_network(art, network_config, self.device)
            self.refiner = load_refiner(art, self.network, self.device)
            self.mtime_ns = art.mtime_ns if art else None
            self.contract = read_contract(art, self.network.config)  # what these weights were trained under
            if contract is not None:
                check_same(contract, self.contract, "the engine's requested contract", f"the weights {weights}")
        self.cache = _EncodingCache(self.config.cache_bytes)
        self.last_info: dict = {}
        self._times: dict = {}
        if self.config.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16 must be 'auto', 'on' or 'off', not {self.config.bf16!r}")
        self.bf16 = self.config.bf16 == "on" or (self.config.bf16 == "auto" and bf16_ok(self.device))

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _timed(self, what: str, t0: float) -> None:
        self._times[what] = self._times.get(what, 0.0) + time.perf_counter() - t0

    def _net_encode(self, x, net: EnsamNet | None = None):
        t0 = time.perf_counter()
        with self._autocast():
            feats = (net or self.network).encode(x)
        self._timed("encode_s", t0)
        return feats

    def _net_decode(self, feats, p, t, dense, lab=None, net: EnsamNet | None = None, multimask: bool = False):
        """Logits (B, 1, *s); with ``multimask`` (a network with a mask head), (logits (B, K, *s), quality (B, K))."""
        t0 = time.perf_counter()
        with self._autocast():
            net = net or self.network
            if multimask:
                logits, quality = net.decode_masks(feats, p, t, dense, lab)
                out = (logits.float(), quality.float())
            else:
                out = net.decode(feats, p, t, dense, lab).float()
        self._timed("decode_s", t0)
        return out

    # ------------------------------------------------------------------ weights
    def reload_if_changed(self) -> bool:
        """Re-read the weights file if it changed on disk (invalidates the cache). Returns True if reloaded."""
        if not self.weights or not os.path.exists(self.weights):
            return False
        if os.stat(self.weights).st_mtime_ns == self.mtime_ns:
            return False
        with self._lock:
            art = load_artefact(self.weights)
            network = load_network(art, self._network_config, self.device)
            self.contract = read_contract(art, network.config)
            self.mtime_ns = art.mtime_ns
            self.set_network(network, load_refiner(art, network, self.device))
        return True

    def set_network(self, network: EnsamNet, refiner: EnsamNet | None = None) -> None:
        """Use another network (e.g. after training; ``refiner``: its corrective steps' network, None = the same
        network answers every step); the encoding cache is invalidated."""
        with self._lock:
            self.network = network.to(self.device).eval()
            self.refiner = refiner.to(self.device).eval() if refiner is not None else None
            self._version += 1
            self.cache.clear()

    # ------------------------------------------------------------------ interactive
    def _encode(self, image: np.ndarray, roi: Roi, key: str, flip: tuple = (), net: EnsamNet | None = None):
        """Encoder features of the ROI (the model grid flipped along the model axes ``flip``) by ``net`` (None: the
        main network), from the cache when there. Returns (features, cache hit)."""
        ck = (key, roi, self._version, flip, net is not None and net is self.refiner)
        feats = self.cache.get(ck)
        if feats is None:
            x = crop_to_model(image, roi).to(self.device)[None]
            if flip:
                x = torch.flip(x, [2 + d for d in flip])
            feats = self._net_encode(x, net)
            self.cache.put(ck, feats)
            return feats, False
        return feats, True

    def _pick_roi(self, shape, spacing, bxs, fg, mask_box, key, image=None) -> Roi:
        """The ROI for these prompts (``mask_box``: the previous mask's bounding box or None); for a refinement step
        (a previous mask), an already-encoded ROI of the same image is reused when it contains the prompts and is
        not much larger than the fresh choice (so refinement clicks hit the cache). The prompts' union is computed
        once for both."""
        extent = prompt_extent(bxs, fg, mask_box)
        policy = self.contract.roi
        if mask_box is None and not len(bxs) and self.config.lone_click_view is not None and image is not None:
            policy = replace(policy, click_extent_mm=self.config.lone_click_view.view_mm(image, spacing, fg[0]))
        roi = choose_roi(shape, spacing, policy=policy, extent=extent)
        if mask_box is None:
            # a first prompt always gets its own ROI: reusing another object's cached ROI (up to 1.6x larger) made a
            # lone click's answer depend on what was segmented before (one-click DSC of one structure moved by up
            # to 0.4 between two evaluation runs that differed only in earlier structures)
            return roi
        lo, hi, _ = extent
        for cached in self.cache.rois_for(key, self._version):
            if cached.model_shape != roi.model_shape or not cached.contains(lo, hi):
                continue
            if np.all(np.asarray(cached.size) <= self.config.reuse_roi_growth * np.asarray(roi.size)):
                return cached
        return roi

    def segment(self, image: np.ndarray, affine, points=None, point_labels=None, boxes=None, prev_mask=None,
                image_key: str | None = None, prompts: Prompts | None = None) -> np.ndarray:
        """Segment one object. image (X, Y, Z) as stored; affine 4x4; points (N, 3) voxel indices with
        point_labels (N,) 1 = foreground / 0 = background; boxes [[i0, i1, j0, j1, k0, k1], ...]; prev_mask
        (X, Y, Z) (non-zero = object). ``prompts``: the same already checked by :func:`lib.geometry.check_prompts`
        for this image (the infer task's; then points/point_labels/boxes are ignored). Several boxes are several
        objects: each is segmented (with the clicks inside it) and the results are united. Returns uint8 (X, Y, Z)
        0/1 (Fortran-ordered). Raises PromptError for unusable prompts.

        Work on the whole volume: one bounding box of the previous mask and one copy of it into the answer; the
        rest (ROI crop, previous mask on the model grid, paste back) is region-sized."""
        image = np.asarray(image)
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 3:
            raise PromptError(f"expected a 3D image, got shape {list(image.shape)}")
        shape = image.shape
        if prompts is None or tuple(prompts.shape) != tuple(shape):
            prompts = check_prompts(points, point_labels, boxes, shape)
        pts, labels, bxs = prompts.points, prompts.point_labels, prompts.box_array
        prev, prev_box = None, None
        if prev_mask is not None:
            prev = np.asarray(prev_mask)
            if prev.ndim == 4 and prev.shape[0] == 1:
                prev = prev[0]
            if prev.shape != shape:
                raise PromptError(f"previous mask shape {list(prev.shape)} differs from image {list(shape)}")
            if prev.dtype != bool:
                prev = prev > 0
            prev_box = mask_bbox(prev)
        if not len(bxs) and not np.any(labels == 1) and prev_box is None:
            raise PromptError("no prompt: give a box (roi), at least one foreground click, or a previous mask")
        key = image_key or image_fingerprint(image, affine)
        spacing = spacing_from_affine(affine)
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            self._times = {}
            groups = [(pts, labels, bxs, prev, prev_box)]
            if len(bxs) > 1:  # several objects: each box with the clicks inside it and the previous mask in it
                groups = []
                for b in bxs:
                    inside = np.all((pts >= b[0::2]) & (pts <= b[1::2]), axis=1)
                    pm, pm_box = None, None
                    if prev is not None:
                        sl = tuple(slice(int(a), int(c) + 1) for a, c in zip(b[0::2], b[1::2]))
                        pm = np.zeros(shape, dtype=bool)  # zero pages cost nothing until written
                        pm[sl] = prev[sl]
                        pm_box = mask_bbox(pm[sl])
                        if pm_box is not None:
                            pm_box = pm_box + np.repeat(b[0::2], 2)
                    groups.append((pts[inside], labels[inside], b[None], pm, pm_box))
            parts, objects = [], []
            for g in groups:  # each object's ROI, cache hits, zooms, ... (the answer reports every object's)
                parts.append(self._segment_one(image, spacing, *g, key))
                objects.append(dict(self.last_info))
            tp = time.perf_counter()
            # the previous result outside the predicted regions is kept (nothing lost); inside them, replaced. In
            # Fortran order, the order NIfTI and NRRD store voxels in: the answer is written without a transpose
            # (a 512x512x61 mask: nib.save 65 ms instead of 196 ms from C order), and the session keeps the order
            out = prev.astype(np.uint8, order="F") if prev is not None else np.zeros(shape, np.uint8, order="F")
            for region, _ in parts:
                out[region] = 0
            for region, new in parts:
                out[region] |= new
            self._timed("paste_s", tp)
        # the first object's fields at the top (one object: as before), every object's under "objects"; the
        # request's totals: cache hits and zooms summed over the objects
        self.last_info = dict(objects[0], objects=objects, cache_hits=sum(o["cache_hits"] for o in objects),
                              zooms=sum(o["zooms"] for o in objects))
        self.last_info["seconds"] = time.perf_counter() - t0
        self.last_info.update({k: round(v, 4) for k, v in self._times.items()})  # encode_s, decode_s, paste_s
        return out

    def _segment_one(self, image, spacing, pts, labels, bxs, prev_mask, prev_box, key):
        """Predict one object: (the region of the original grid its ROI covers, the uint8 mask there)."""
        shape = image.shape
        fg = pts[labels == 1]
        net = self.refiner if prev_mask is not None and self.refiner is not None else self.network
        roi = self._pick_roi(shape, spacing, bxs, fg, prev_box, key, image)
        hits, zooms = 0, 0
        multimask = (self.config.multimask and prev_mask is None and not len(bxs) and net is self.network
                     and net.mask_head is not None)
        if self.config.lone_click_probe and prev_mask is None and not len(bxs):
            roi, hits = self._probe_view(image, spacing, pts, labels, bxs, key, roi, multimask)
        for zoom in range(self.config.max_zoom + 1):
            pm = None
            if prev_mask is not None:
                pm = (mask_to_model(prev_mask, roi) > 0.5).float().to(self.device)[None]
            logits, hit, pick = self._predict(image, roi, key, pts, labels, bxs, pm, net, multimask)
            hits += hit
            model_mask = (logits > self.config.threshold).cpu().numpy()
            if zoom == self.config.max_zoom or len(bxs) or not roi.touches_border(model_mask, shape):
                break  # a box bounds the object: AutoZoom is for prompts without one
            roi = roi.enlarged(self.config.zoom_factor)
            zooms += 1
        if self.config.refiner_warm and self.refiner is not None and net is self.network and prev_mask is None:
            for flip in ((),) + self.config.tta_flips:  # what the corrective clicks on this ROI will need
                self._encode(image, roi, key, flip, self.refiner)
        # the ROI's part inside the image, as a region of the original grid (all further work is region-sized)
        st, sz = np.asarray(roi.start), np.asarray(roi.size)
        a, b = np.maximum(st, 0), np.minimum(st + sz, shape)
        region = tuple(slice(int(x), int(y)) for x, y in zip(a, b))
        local = roi.shifted(a)
        rshape = tuple(int(x) for x in b - a)
        tp = time.perf_counter()
        new = logits_to_original(logits, local, rshape, threshold=self.config.threshold)
        self._timed("paste_s", tp)
        changed = None
        if pm is not None and self.config.keep_fine_prev:
            prev_r = prev_mask[region]
            prev_coarse = logits_to_original(pm[0, 0] - 0.5, local, rshape)  # the previous mask as the net saw it
            changed = new != prev_coarse
            new = np.where(changed, new, prev_r).astype(np.uint8)
        n_win = self._refine(image, pts, labels, bxs, roi, a, new, changed, key, corrective=pm is not None, net=net)
        if pm is not None and self.config.local_edits and len(pts):
            new = _local_edit(prev_mask[region], new, np.asarray(pts[-1]) - a)
        if self.config.boundary_cut is not None and new.any():
            tc = time.perf_counter()
            inside = np.all((pts >= a) & (pts < b), axis=1)
            box = bxs[0] - np.repeat(a, 2) if len(bxs) else None
            new = self.config.boundary_cut.refine(image[region], new, spacing, pts[inside] - a, labels[inside],
                                                  box).astype(np.uint8)
            self._timed("cut_s", tc)
        if pm is not None and self.config.correction_reach and len(pts):
            k, margin, *mode = self.config.correction_reach
            inside = np.all((pts >= a) & (pts < b), axis=1)
            new = conservative_merge(prev_mask[region], new, pts[inside] - a, labels[inside], spacing, float(k),
                                     float(margin), *(str(m) for m in mode))
        self.last_info = {"roi_start": list(roi.start), "roi_size": list(roi.size), "cache_hits": hits,
                          "zooms": zooms, "refine_windows": n_win,
                          "weights": "refiner" if net is not self.network else "main"}
        if pick is not None:
            self.last_info["mask"] = pick
        return region, new

    def _probe_view(self, image, spacing, pts, labels, bxs, key, roi: Roi,
                    multimask: bool = False) -> tuple[Roi, int]:
        """``lone_click_probe``: (the ROI sized from the network's answers, cache hits): a pass in the probe view,
        then ``rounds`` times the view = the answer's largest extent x scale (a view that would not shrink ends
        the rounds); the given ``roi`` when the probe answers nothing."""
        probe_mm, scale, *rest = (float(v) for v in self.config.lone_click_probe)
        rounds = int(rest[0]) if rest else 1
        policy = replace(self.contract.roi, click_extent_mm=probe_mm)
        extent = prompt_extent(bxs, pts[labels == 1], None)
        cur, view, hits = choose_roi(image.shape, spacing, policy=policy, extent=extent), probe_mm, 0
        for r in range(rounds):
            logits, hit, _ = self._predict(image, cur, key, pts, labels, bxs, None, None, multimask)
            hits += hit
            bb = mask_bbox((logits > self.config.threshold).cpu().numpy())
            if bb is None:
                return (roi if r == 0 else cur), hits
            edge = bbox_edge_mm(bb, np.asarray(spacing, float) / cur.scale)  # model voxels of this ROI, in mm
            new_view = float(np.clip(edge * scale, policy.min_extent_mm, view))
            if r > 0 and new_view >= 0.9 * view:
                break
            view = new_view
            cur = choose_roi(image.shape, spacing, policy=replace(policy, click_extent_mm=view), extent=extent)
        return cur, hits

    def _predict(self, image, roi: Roi, key, pts, labels, bxs, pm, net: EnsamNet | None = None,
                 multimask: bool = False):
        """Logits (*model_shape) of the ROI by ``net`` (None: the main network): the plain view, averaged with the
        ``tta_flips`` views when set; with ``multimask``, every mask and its predicted DSC averaged over the views,
        then the mask with the highest. Returns (logits, cache hits, the choice {"index", "quality", "qualities"}
        or None)."""
        total, quality, hits = None, None, 0
        views = ((),) + self.config.tta_flips
        for flip in views:
            feats, hit = self._encode(image, roi, key, flip, net)
            hits += hit
            lg, q = self._decode_in(roi, feats, pts, labels, bxs, pm, flip, net, multimask)
            total = lg if total is None else total + lg
            quality = q if quality is None else quality + q
        if len(views) > 1:
            total = total / len(views)
            quality = quality / len(views) if quality is not None else None
        if quality is None:
            return total, hits, None
        qs = torch.sigmoid(quality)
        k = int(torch.argmax(qs))
        pick = {"index": k, "quality": round(float(qs[k]), 4), "qualities": [round(float(v), 4) for v in qs]}
        return total[k], hits, pick

    def _decode_in(self, roi: Roi, feats, pts, labels, bxs, pm, flip: tuple = (),
                   net: EnsamNet | None = None, multimask: bool = False):
        """(logits (*model_shape), None) of the ROI for clicks ``pts`` (``labels`` 1/0), boxes ``bxs`` (original
        voxels) and the model-grid previous mask ``pm`` (1, 1, *model_shape) or None; with ``multimask``, (every
        mask's logits (K, *model_shape), their predicted DSC logits (K,)). ``flip``: ``feats`` are of the grid
        flipped along these model axes; the prompts are flipped to match and the logits flipped back."""
        model_pts = [flip_model_points(roi.to_model(pts), roi.model_shape, flip)]
        types = [np.where(labels == 1, FG, BG)]
        if len(bxs):
            mb = flip_model_boxes(roi.boxes_to_model(bxs), roi.model_shape, flip)
            model_pts.append(np.stack([mb[:, 0::2], mb[:, 1::2]], axis=1).reshape(-1, 3))
            types.append(np.tile([BOX_MIN, BOX_MAX], len(bxs)))
        p = torch.as_tensor(np.concatenate(model_pts), dtype=torch.float32, device=self.device)[None]
        t = torch.as_tensor(np.concatenate(types), dtype=torch.long, device=self.device)[None]
        if flip and pm is not None:
            pm = torch.flip(pm, [2 + d for d in flip])
        dense = dense_prompt_maps(p, t, roi.model_shape, pm, sigma=self.contract.click_sigma)
        if multimask:
            logits, quality = self._net_decode(feats, p, t, dense, net=net, multimask=True)
            out, quality = logits[0], quality[0]
            return (torch.flip(out, [1 + d for d in flip]) if flip else out), quality
        out = self._net_decode(feats, p, t, dense, net=net)[0, 0]
        return (torch.flip(out, list(flip)) if flip else out), None

    def _refine(self, image, pts, labels, bxs, roi: Roi, a, new: np.ndarray, changed, key,
                corrective: bool = False, net: EnsamNet | None = None) -> int:
        """Native-resolution refinement of ``new`` (the ROI's region of the original grid, starting at voxel
        ``a``; modified in place) around its boundary, see :class:`EngineConfig`; ``corrective``: a step with a
        previous mask (fewer windows, the latest click's first); ``changed``: where the coarse decision moved (the
        band is restricted to it). Returns the windows run."""
        cfg = self.config
        n_max = cfg.refine_windows_click if corrective else cfg.refine_windows
        if (not self.contract.refine or n_max <= 0 or roi.voxels_per_model_voxel.max() <= cfg.refine_factor
                or not new.any()):
            return 0
        fine_vox = roi.finer_voxels(cfg.refine_zoom)
        wsize = np.asarray(roi.finer_window(np.zeros(3), cfg.refine_zoom).size)  # window edge, scan voxels
        reach = wsize / 2 - cfg.refine_margin * fine_vox  # a window's interior, around its centre

        def cover(c) -> np.ndarray:
            return np.all(np.abs(cand - c) <= reach, axis=1)

        band = new.astype(bool) ^ ndimage.binary_erosion(new.astype(bool))
        if changed is not None:  # a corrective step: only where the coarse decision moved
            band &= ndimage.binary_dilation(changed, iterations=2)
        centres = []
        if corrective and len(pts):  # the latest click first
            centres.append(np.asarray(pts[-1], float) - a)
        cand = np.argwhere(band)
        if len(cand) > 20000:
            cand = cand[:: len(cand) // 20000 + 1]
        covered = np.zeros(len(cand), bool)
        for c in centres:
            covered |= cover(c)
        while len(centres) < n_max and len(cand) and not covered.all():
            left = cand[~covered]
            c = left[np.argmin(np.abs(left - left.mean(0)).sum(1))] if not centres else \
                left[np.argmax(np.min([np.abs(left - c0).max(1) for c0 in centres], axis=0))]
            centres.append(c.astype(float))
            covered |= cover(c)
        rshape = np.asarray(new.shape)
        for c in centres:
            win = roi.finer_window(c + a, cfg.refine_zoom)
            win_r = win.shifted(a)  # region coordinates
            start_r = np.asarray(win_r.start)
            feats, _ = self._encode(image, win, key, (), net)
            inside = np.all((pts >= win.start) & (pts <= np.asarray(win.start) + wsize - 1), axis=1)
            pm = (mask_to_model(new, win_r) > 0.5).float().to(self.device)[None]
            logits, _ = self._decode_in(win, feats, pts[inside], labels[inside], bxs, pm, (), net)
            # write back inside the window, refine_margin fine voxels from faces that are not the region's faces
            m = np.round(cfg.refine_margin * fine_vox).astype(int)
            lo = np.maximum(start_r + np.where(start_r > 0, m, 0), 0)
            hi = np.minimum(start_r + wsize - np.where(start_r + wsize < rshape, m, 0), rshape)
            if np.any(hi <= lo):
                continue
            inner = tuple(slice(int(x), int(y)) for x, y in zip(lo, hi))
            part = win_r.shifted(lo)
            new[inner] = logits_to_original(logits, part, tuple(int(x) for x in hi - lo),
                                            threshold=self.config.threshold)
        return len(centres)

    # ------------------------------------------------------------------ prompt-free
    def segment_label(self, image: np.ndarray, affine, label_id: int, batch_size: int = 1) -> np.ndarray:
        """Prompt-free segmentation of the structure named by ``label_id`` (a learned label token) over the whole
        volume; see :meth:`segment_labels`. Returns uint8 (X, Y, Z)."""
        return self.segment_labels(image, affine, [label_id], batch_size)[int(label_id)]

    def segment_labels(self, image: np.ndarray, affine, label_ids, batch_size: int = 1,
                       labels_per_pass: int = 8, spacing_mm: float | None = None) -> dict:
        """Prompt-free segmentation of several structures at once: resample to the contract's
        ``label_spacing_mm`` isotropic, sliding windows of the model size, each window ENCODED ONCE and decoded for
        every label token (in groups of ``labels_per_pass``, batched), then back to the original grid.
        ``spacing_mm``: a coarser working spacing for a cheap approximation (uncertainty scoring); None = the
        contract's. Returns {label id: uint8 (X, Y, Z)}."""
        from monai.inferers import sliding_window_inference

        image = np.asarray(image)
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        ids = [int(i) for i in label_ids]
        bad = [i for i in ids if not 0 <= i < self.network.config.num_labels]
        if bad:
            raise PromptError(f"label id {bad[0]} is out of range 0..{self.network.config.num_labels - 1}")
        if not ids:
            return {}
        shape = np.asarray(image.shape)
        spacing = spacing_from_affine(affine)
        work_mm = self.contract.label_spacing_mm if spacing_mm is None else float(spacing_mm)
        work = np.maximum(np.round(shape * spacing / work_mm), 1).astype(int)
        roi = Roi((0, 0, 0), tuple(int(s) for s in shape), tuple(int(s) for s in work))
        win = tuple(self.network.config.roi_size)
        uniq = list(dict.fromkeys(ids))
        with self._lock, torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(self.device)
            x = F.interpolate(x, size=tuple(int(s) for s in work), mode="trilinear", align_corners=False)
            labs = torch.tensor(uniq, device=self.device)

            def predictor(batch: torch.Tensor) -> torch.Tensor:  # (B, 1, *win) -> (B, L, *win)
                outs = []
                for w in batch:
                    xw = normalize_intensity(w)[None]
                    feats = self._net_encode(xw)
                    chans = []
                    for g in range(0, len(uniq), labels_per_pass):
                        lab = labs[g:g + labels_per_pass]
                        n = len(lab)
                        p = torch.zeros(n, 0, 3, device=self.device)
                        t = torch.zeros(n, 0, dtype=torch.long, device=self.device)
                        dense = torch.zeros(n, 4, *xw.shape[2:], device=self.device)
                        fb = [f.expand(n, *f.shape[1:]) for f in feats]
                        chans.append(self._net_decode(fb, p, t, dense, lab)[:, 0])
                    outs.append(torch.cat(chans)[None])
                return torch.cat(outs)

            logits = sliding_window_inference(x, win, batch_size, predictor, overlap=self.config.label_overlap,
                                              mode="gaussian", padding_mode="replicate")
        return {i: logits_to_original(logits[0, c], roi, tuple(shape), threshold=self.config.threshold)
                for c, i in enumerate(uniq)}

    def encode_features(self, image: np.ndarray) -> np.ndarray:
        """A global descriptor of an image (latent features of the whole volume resized to the model grid,
        averaged), used by active learning's novelty score. Returns (C,) float32."""
        image = np.asarray(image)
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        roi = Roi((0, 0, 0), tuple(int(s) for s in image.shape), tuple(self.network.config.roi_size))
        with self._lock, torch.inference_mode():
            feats = self._net_encode(crop_to_model(image, roi).to(self.device)[None])
            return feats[-1].mean(dim=(2, 3, 4))[0].float().cpu().numpy()
