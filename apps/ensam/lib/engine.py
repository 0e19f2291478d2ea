"""EnsamEngine: whole-volume interactive inference with an encoding cache, and prompt-free label segmentation.

All prompt geometry goes through :mod:`lib.geometry`. Typical use::

    eng = EnsamEngine(weights="apps/ensam/model/pretrained_ensam.pt")
    mask = eng.segment(image, affine, boxes=[[10, 40, 20, 60, 5, 15]])
    mask = eng.segment(image, affine, boxes=[...], points=[[25, 40, 10]], point_labels=[0], prev_mask=mask)

Weights with a refiner (``lib.weights``: a second set of weights of the same network and contract) answer the
steps that start from a previous mask with the refiner and everything else (a first box or click, prompt-free
segmentation, the lone-click probe) with the main weights; the step's info (``weights``) says which answered.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .contract import Contract, check_same, contract_for_network, read_contract
from .correction import conservative_merge
from .engine_config import EngineConfig
from .engine_parts import EncodingCache, bf16_ok, image_fingerprint, load_network, load_refiner, use_bf16
from .geometry import (PromptError, Prompts, Roi, bbox_edge_mm, check_prompts, choose_roi, crop_to_model,
                       flip_model_boxes, flip_model_points, logits_to_original, mask_bbox, mask_to_model,
                       normalize_intensity, prompt_extent, spacing_from_affine)
from .network import BG, BOX_MAX, BOX_MIN, FG, EnsamNet, NetworkConfig, dense_prompt_maps
from .weights import load_artefact

__all__ = ["EngineConfig", "EnsamEngine", "PromptError", "load_network", "image_fingerprint", "bf16_ok"]

logger = logging.getLogger(__name__)



class EnsamEngine:
    """Interactive and prompt-free segmentation of whole volumes with an :class:`EnsamNet`.

    Args:
        network: a built network (takes precedence), else ``weights`` (a weights file, :mod:`lib.weights`) with
            ``network_config``. Published weights are picked up by building a new engine
            (:class:`lib.infers.engine_provider.EngineProvider`) or by :meth:`set_network`.
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
        self.cache = EncodingCache(self.config.cache_bytes)
        self.last_info: dict = {}  # the info of the latest segment() call (segment_step returns it instead)
        self._times: dict = {}  # the running call's time split, under self._lock (handed over and emptied at its end)
        self.bf16 = use_bf16(self.config.bf16, self.device)

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

    def _pick_roi(self, shape, spacing, bxs, fg, mask_box, own_rois=(), image=None) -> Roi:
        """The ROI for these prompts (``mask_box``: the previous mask's bounding box or None); for a refinement step
        (a previous mask), one of ``own_rois`` (the ROIs of the same session's previous step, already encoded) is
        reused when it contains the prompts and is not much larger than the fresh choice (so refinement clicks hit
        the cache). Only the session's own: reusing any cached ROI of the image made a corrective step's answer
        depend on other users' requests (CT spleen through HTTP: 0.956 alone, 0.946 after another client's box;
        docs/HISTORY.md, "Answers that depend on other sessions' ROIs"). The prompts' union is computed once."""
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
        for own in own_rois:
            if own.model_shape != roi.model_shape or not own.contains(lo, hi):
                continue
            if np.all(np.asarray(own.size) <= self.config.reuse_roi_growth * np.asarray(roi.size)):
                return own
        return roi

    @staticmethod
    def step_rois(info: dict | None, model_shape) -> list[Roi]:
        """The ROIs a step's info (:meth:`segment_step`'s) reports under ``objects``, one per object (none for None
        or {}: a session after an undo)."""
        shape = tuple(int(v) for v in model_shape)
        return [Roi(tuple(int(v) for v in o["roi_start"]), tuple(int(v) for v in o["roi_size"]), shape)
                for o in (info or {}).get("objects", [])]

    def segment(self, image: np.ndarray, affine, points=None, point_labels=None, boxes=None, prev_mask=None,
                image_key: str | None = None, prompts: Prompts | None = None,
                prev_info: dict | None = None) -> np.ndarray:
        """:meth:`segment_step`'s mask; its info is also left in ``last_info`` for single-threaded callers (the
        evaluator, the benchmark, tests). The server never reads ``last_info``: its sessions
        (:class:`lib.session.InteractiveSession`) take the info :meth:`segment_step` returns with the mask."""
        mask, self.last_info = self.segment_step(image, affine, points, point_labels, boxes, prev_mask, image_key,
                                                 prompts, prev_info)
        return mask

    def segment_step(self, image: np.ndarray, affine, points=None, point_labels=None, boxes=None, prev_mask=None,
                     image_key: str | None = None, prompts: Prompts | None = None,
                     prev_info: dict | None = None) -> tuple[np.ndarray, dict]:
        """Segment one object and say how: (mask, info). image (X, Y, Z) as stored; affine 4x4; points (N, 3) voxel
        indices with point_labels (N,) 1 = foreground / 0 = background; boxes [[i0, i1, j0, j1, k0, k1], ...];
        prev_mask (X, Y, Z) (non-zero = object). ``prompts``: the same already checked by
        :func:`lib.geometry.check_prompts` for this image (the infer task's; then points/point_labels/boxes are
        ignored); ``prev_info``: the info of the same session's previous step (with ``prev_mask``), whose ROIs this
        step may reuse (:meth:`_pick_roi`; without it a corrective step gets a fresh ROI). Several boxes are several
        objects: each is segmented (with the clicks inside it) and the results are united. Returns uint8 (X, Y, Z)
        0/1 (Fortran-ordered) and the step's info: ROI, cache hits, zooms, refinement windows, which weights
        answered, the multi-mask choice, times (``encode_s``, ``decode_s``, ``paste_s``, ``cut_s``, ``seconds``);
        with several boxes, the first object's at the top and every object's under ``objects``. Nothing of the step
        stays in the engine but its cached encodings. Raises PromptError for unusable prompts.

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
        own_rois = self.step_rois(prev_info, self.contract.roi.model_shape) if prev is not None else []
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
                region, new, obj = self._segment_one(image, spacing, *g, key, own_rois)
                parts.append((region, new))
                objects.append(obj)
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
            times, self._times = self._times, {}
        # the first object's fields at the top (one object: as before), every object's under "objects"; the
        # request's totals: cache hits and zooms summed over the objects
        info = dict(objects[0], objects=objects, cache_hits=sum(o["cache_hits"] for o in objects),
                    zooms=sum(o["zooms"] for o in objects))
        info["seconds"] = time.perf_counter() - t0
        info.update({k: round(v, 4) for k, v in times.items()})  # encode_s, decode_s, paste_s, cut_s
        return out, info

    def _segment_one(self, image, spacing, pts, labels, bxs, prev_mask, prev_box, key, own_rois=()):
        """Predict one object: (the region of the original grid its ROI covers, the uint8 mask there, its info)."""
        shape = image.shape
        fg = pts[labels == 1]
        net = self.refiner if prev_mask is not None and self.refiner is not None else self.network
        roi = self._pick_roi(shape, spacing, bxs, fg, prev_box, own_rois, image)
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
        n_win = self._refine(image, pts, labels, bxs, roi, a, new, key, corrective=pm is not None, net=net)
        if self.config.boundary_cut is not None and new.any():
            tc = time.perf_counter()
            inside = np.all((pts >= a) & (pts < b), axis=1)
            box = bxs[0] - np.repeat(a, 2) if len(bxs) else None
            new = self.config.boundary_cut.refine(image[region], new, spacing, pts[inside] - a, labels[inside],
                                                  box).astype(np.uint8)
            self._timed("cut_s", tc)
        # a box bounds the object: correction_reach; without one, a lone click's first answer is a guess at the
        # object's extent that the corrections must be free to move: lone_correction_reach (issue 27)
        reach = self.config.correction_reach if len(bxs) else self.config.lone_correction_reach
        if pm is not None and reach and len(pts):
            k, margin, *rest = reach
            inside = np.all((pts >= a) & (pts < b), axis=1)
            new = conservative_merge(prev_mask[region], new, pts[inside] - a, labels[inside], spacing, float(k),
                                     float(margin), *(str(m) for m in rest[:1]), *(float(g) for g in rest[1:2]))
        info = {"roi_start": list(roi.start), "roi_size": list(roi.size), "cache_hits": hits, "zooms": zooms,
                "refine_windows": n_win, "weights": "refiner" if net is not self.network else "main"}
        if pick is not None:
            info["mask"] = pick
        return region, new, info

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

    def _refine(self, image, pts, labels, bxs, roi: Roi, a, new: np.ndarray, key,
                corrective: bool = False, net: EnsamNet | None = None) -> int:
        """Native-resolution refinement of ``new`` (the ROI's region of the original grid, starting at voxel
        ``a``; modified in place) around its boundary, see :class:`EngineConfig`; ``corrective``: a step with a
        previous mask (fewer windows, the latest click's first). Returns the windows run."""
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
