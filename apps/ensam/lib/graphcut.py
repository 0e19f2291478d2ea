"""Seeded graph cuts on a native-resolution crop: the pieces the graph-cut baseline
(:class:`lib.evaluation.baselines.GraphCut`) and the engine's boundary cut (:class:`BoundaryCut`) share.

:class:`BoundaryCut` is an inference stage after the network (``EngineConfig.boundary_cut``): the network's mask
becomes a soft prior (its signed distance, ``tau_mm``), mixed in the log-odds with an intensity model learnt from
that mask and the clicks' neighbourhoods, and a Boykov-Kolmogorov min-cut (``numpymaxflow``) with an
intensity-contrast pairwise term re-draws the boundary on the scan's own grid, with the clicks as hard seeds and
everything outside the box as background. The network decides what the object is; the cut snaps its boundary to
the image and lets each click act on the voxels of the same intensity around it (what a graph cut is good at,
and what a 64^3 model grid and weak click reading are not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .geometry import mask_bbox

__all__ = ["BoundaryCut", "balls", "block_mean", "click_seeds", "equalise", "histogram_probability", "impose_clicks",
           "keep_seeded"]


def equalise(x: np.ndarray, bins: int = 256, clip: float = 4.0) -> np.ndarray:
    """float32 in [0, 1] by clip-limited histogram equalisation of the crop (global, CLAHE-style limit).

    The 0.5th..99.5th percentile range is cut into ``bins`` bins; bin counts are capped at ``clip`` x the mean
    count (the excess spread evenly), and the cumulative histogram is the mapping. Contrast goes where the crop's
    intensities are (e.g. abdominal soft tissue rather than the -1000..1500 HU of air and bone, without any
    modality-specific window), but a flat, noisy region is stretched at most ``clip`` times more than by a linear
    rescale, so noise is not blown up to the full range as plain equalisation would do.
    """
    x = np.asarray(x, dtype=np.float32)
    lo, hi = np.percentile(x, [0.5, 99.5])
    if not hi > lo:
        return np.zeros(x.shape, dtype=np.float32)
    h, edges = np.histogram(np.clip(x, lo, hi), bins=bins, range=(lo, hi))
    h = h.astype(np.float64)
    limit = clip * h.mean()
    excess = np.maximum(h - limit, 0.0).sum()
    h = np.minimum(h, limit) + excess / bins
    cdf = np.concatenate([[0.0], np.cumsum(h)])
    cdf /= cdf[-1]
    return np.interp(x.ravel(), edges, cdf).astype(np.float32).reshape(x.shape)


def block_mean(x: np.ndarray, factors) -> np.ndarray:
    """Means of ``x`` (3D, each edge a multiple of its factor) over blocks of ``factors`` voxels (float32)."""
    f = [int(k) for k in factors]
    n = [int(s) // k for s, k in zip(x.shape, f)]
    return np.asarray(x, dtype=np.float32).reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5))


def balls(shape, centres, radius_mm, spacing) -> np.ndarray:
    """Union of ellipsoids of ``radius_mm`` (at least the centre voxel) around ``centres`` (crop coordinates)."""
    out = np.zeros(shape, dtype=bool)
    r = np.maximum(np.floor(radius_mm / np.asarray(spacing, dtype=np.float64)), 0).astype(int)
    for c in np.asarray(centres, dtype=np.int64).reshape(-1, 3):
        lo = np.maximum(c - r, 0)
        hi = np.minimum(c + r, np.asarray(shape) - 1)
        if np.any(lo > hi):
            continue
        grids = np.ogrid[tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))]
        d2 = sum(((g - cc) * s) ** 2 for g, cc, s in zip(grids, c, spacing))
        out[tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))] |= d2 <= max(radius_mm, 0.0) ** 2 + 1e-9
        if np.all((c >= 0) & (c < np.asarray(shape))):
            out[tuple(c)] = True
    return out


def click_seeds(shape, fl, bl, click_mm, spacing):
    """(foreground, background) seed masks from clicks in crop coordinates: balls of ``click_mm``; where balls
    overlap the background wins, but every click's own voxel keeps its own label."""
    fg = balls(shape, fl, click_mm, spacing) if len(fl) else np.zeros(shape, dtype=bool)
    bg = balls(shape, bl, click_mm, spacing) if len(bl) else np.zeros(shape, dtype=bool)
    fg &= ~bg
    inside = lambda p: np.all((p >= 0) & (p < np.asarray(shape)))  # noqa: E731
    for p in np.asarray(fl, dtype=np.int64).reshape(-1, 3):
        if inside(p):
            fg[tuple(p)], bg[tuple(p)] = True, False
    for p in np.asarray(bl, dtype=np.int64).reshape(-1, 3):
        if inside(p):
            fg[tuple(p)], bg[tuple(p)] = False, True
    return fg, bg


def keep_seeded(mask: np.ndarray, seeds: np.ndarray, fallback_largest: bool = True) -> np.ndarray:
    """Components (26-connected) of ``mask`` that touch the boolean ``seeds`` mask; the largest one when none
    does (and ``fallback_largest``)."""
    import cc3d

    if not mask.any():
        return mask
    labels = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    keep = np.unique(labels[seeds & mask])
    keep = keep[keep != 0]
    if keep.size == 0:
        if not fallback_largest:
            return mask
        counts = np.bincount(labels.ravel())
        counts[0] = 0
        keep = np.array([int(np.argmax(counts))])
    if keep.size == 1:
        return labels == keep[0]
    return np.isin(labels, keep)


def impose_clicks(mask: np.ndarray, fl, bl) -> np.ndarray:
    """Set the clicked voxels (crop coordinates) to their click's label, in click order of kind (fg, then bg)."""
    mask = mask.copy()
    shape = np.asarray(mask.shape)
    for pts, val in ((fl, True), (bl, False)):
        for p in np.asarray(pts, dtype=np.int64).reshape(-1, 3):
            if np.all((p >= 0) & (p < shape)):
                mask[tuple(p)] = val
    return mask


def histogram_probability(idx: np.ndarray, fg: np.ndarray, bg: np.ndarray, fg_click: np.ndarray,
                          bg_click: np.ndarray, bins: int, fg_click_weight: float = 0.5,
                          bg_click_weight: float = 0.2, floor: float = 0.02) -> np.ndarray:
    """P(fg | intensity) per voxel (float32, clipped to [floor, 1 - floor]) from the intensity histograms
    (``bins`` bins of the bin index map ``idx``) of the boolean masks ``fg`` and ``bg``, each mixed with the
    histogram of its clicks' neighbourhood (``fg_click`` / ``bg_click``, weights ``*_click_weight``), smoothed."""
    def hist(mask):
        h = np.bincount(idx[mask], minlength=bins).astype(np.float64)
        return h / max(h.sum(), 1.0)

    hf, hb = hist(fg), hist(bg)
    if fg_click.any() and fg_click_weight > 0:
        hf = (1 - fg_click_weight) * hf + fg_click_weight * hist(fg_click)
    if bg_click.any() and bg_click_weight > 0:
        hb = (1 - bg_click_weight) * hb + bg_click_weight * hist(bg_click)
    hf = ndimage.gaussian_filter1d(hf + 1e-4, 1.0)
    hb = ndimage.gaussian_filter1d(hb + 1e-4, 1.0)
    p = hf / (hf + hb)
    return np.clip(p[idx], floor, 1 - floor).astype(np.float32)


@dataclass
class BoundaryCut:
    """Re-draw a network mask's boundary with a seeded graph cut on the scan's own grid (see the module).

    Per voxel of the crop (the mask's bounding box and the clicks, grown by ``margin_mm``, inside the box grown by
    one voxel), the foreground log-odds are ``net_weight * clip(d / tau_mm, -8, 8) + intensity_weight *
    logit(P(fg | intensity))``, d the signed distance (mm) to the mask's boundary (positive inside) and the
    intensity model :func:`histogram_probability` of the mask against the rest of the crop (with the clicks'
    neighbourhoods). Pairwise: ``lamda * exp(-(I_p - I_q)^2 / 2 sigma^2)`` on the equalised crop, 6-connected.
    Seeds: ``click_mm`` balls around the clicks, and outside the box = background. The clicked voxels are imposed
    on the cut, and only the components holding a foreground click or a voxel of the network's mask are kept; a
    cut that keeps none of the network's mask is not taken (the network's mask stands).

    Time is bounded by ``max_voxels``: a larger crop is cut on a grid coarser by integer factors (the finest axes
    first: block means of the image, the mask's block majority), and the cut is brought back to the scan's grid
    by trilinear interpolation of its indicator."""

    tau_mm: float = 4.0
    net_weight: float = 1.0
    intensity_weight: float = 0.5
    lamda: float = 5.0
    sigma: float = 0.05
    margin_mm: float = 10.0
    click_mm: float = 3.0
    bins: int = 64
    max_voxels: int = 400_000

    def factors(self, shape, spacing) -> np.ndarray:
        """Integer factors per axis that bring ``shape`` within ``max_voxels`` (1 where it already is), raised on
        the axis of finest (spacing x factor) first."""
        f = np.ones(3, dtype=int)
        shape, spacing = np.asarray(shape), np.asarray(spacing, dtype=np.float64)
        while np.prod(np.ceil(shape / f)) > self.max_voxels and np.any(f < shape):
            free = f < shape
            ax = int(np.argmin(np.where(free, spacing * f, np.inf)))
            f[ax] += 1
        return f

    def crop(self, mask: np.ndarray, spacing, points, box=None):
        """The slices of ``mask``'s grid the cut works on, or None when the mask is empty."""
        bb = mask_bbox(mask)
        if bb is None:
            return None
        shape = np.asarray(mask.shape)
        lo, hi = bb[0::2].astype(int), bb[1::2].astype(int)
        pts = np.asarray(points, dtype=np.int64).reshape(-1, 3)
        if len(pts):
            lo, hi = np.minimum(lo, pts.min(0)), np.maximum(hi, pts.max(0))
        grow = np.ceil(self.margin_mm / np.asarray(spacing, float)).astype(int)
        lo, hi = lo - grow, hi + grow
        if box is not None:
            b = np.asarray(box, dtype=np.int64).reshape(6)
            lo, hi = np.maximum(lo, b[0::2] - 1), np.minimum(hi, b[1::2] + 1)
        lo, hi = np.maximum(lo, 0), np.minimum(hi, shape - 1)
        if np.any(hi < lo):
            return None
        return tuple(slice(int(a), int(c) + 1) for a, c in zip(lo, hi))

    def refine(self, image: np.ndarray, mask: np.ndarray, spacing, points=None, point_labels=None,
               box=None) -> np.ndarray:
        """The cut of ``mask`` (bool/uint8 (X, Y, Z), the network's answer) on ``image`` (same grid, any
        intensities); ``points`` (N, 3) voxel indices of this grid with ``point_labels`` (N,) 1 fg / 0 bg; ``box``
        ``[i0, i1, j0, j1, k0, k1]`` (inclusive) or None. Returns a new bool array of ``mask``'s shape: the cut
        inside the crop, the network's mask outside it."""
        mask = np.asarray(mask) != 0
        spacing = np.asarray(spacing, dtype=np.float64)
        pts = np.asarray(points if points is not None else np.zeros((0, 3)), dtype=np.int64).reshape(-1, 3)
        lab = np.asarray(point_labels if point_labels is not None else np.zeros(0), dtype=np.int64).reshape(-1)
        sl = self.crop(mask, spacing, pts, box)
        out = mask.copy()
        if sl is None:
            return out
        lo = np.array([s.start for s in sl])
        m, im = mask[sl], np.asarray(image)[sl]
        f = self.factors(m.shape, spacing)
        b = None if box is None else np.asarray(box, dtype=np.int64).reshape(6) - np.repeat(lo, 2)
        if np.all(f == 1):
            out[sl] = self._cut(im, m, spacing, pts - lo, lab, b)
            return out
        pad = [(0, int(-n % k)) for n, k in zip(m.shape, f)]
        im_c = block_mean(np.pad(im.astype(np.float32), pad, mode="edge"), f)
        m_c = block_mean(np.pad(m, pad, mode="edge"), f) > 0.5
        b_c = None if b is None else np.concatenate([[lo_ // k, hi_ // k] for lo_, hi_, k in
                                                     zip(b[0::2], b[1::2], f)])
        cut = self._cut(im_c, m_c, spacing * f, (pts - lo) // f, lab, b_c)
        # back to the fine grid: the cut's indicator, trilinear between block centres, at 0.5 (a boundary smoother
        # than the blocks), then the crop's own extent
        up = torch.nn.functional.interpolate(torch.from_numpy(cut.astype(np.float32))[None, None],
                                             scale_factor=tuple(float(k) for k in f), mode="trilinear",
                                             align_corners=False)[0, 0].numpy()
        res = up[tuple(slice(0, int(n)) for n in m.shape)] > 0.5
        out[sl] = impose_clicks(res, pts[lab == 1] - lo, pts[lab == 0] - lo)
        return out

    def _cut(self, x_raw: np.ndarray, m: np.ndarray, spacing, pts, lab, box) -> np.ndarray:
        """The cut on one grid: image ``x_raw``, mask ``m`` (bool), clicks ``pts`` (N, 3) of this grid with
        ``lab``, ``box`` of this grid or None. Returns bool of ``m``'s shape."""
        import numpymaxflow

        shape = m.shape
        x = equalise(x_raw)
        d = np.where(m, ndimage.distance_transform_edt(m, sampling=spacing),
                     -ndimage.distance_transform_edt(~m, sampling=spacing))
        logit = self.net_weight * np.clip(d / self.tau_mm, -8.0, 8.0)
        fl, bl = pts[lab == 1], pts[lab == 0]
        if self.intensity_weight:
            idx = np.clip((x * self.bins).astype(np.int64), 0, self.bins - 1)
            near_mm = max(2.0 * self.click_mm, float(spacing.max()))
            fg_near = balls(shape, fl, near_mm, spacing) if len(fl) else np.zeros(shape, bool)
            bg_near = balls(shape, bl, near_mm, spacing) if len(bl) else np.zeros(shape, bool)
            p = histogram_probability(idx, m, ~m, fg_near, bg_near, self.bins)
            logit = logit + self.intensity_weight * np.log(p / (1.0 - p))
        p = np.clip(1.0 / (1.0 + np.exp(-logit)), 1e-4, 1 - 1e-4).astype(np.float32)
        fg_seed, bg_seed = click_seeds(shape, fl, bl, self.click_mm, spacing)
        if box is not None:
            b = np.asarray(box, dtype=np.int64).reshape(6)
            inbox = np.zeros(shape, bool)
            blo, bhi = np.maximum(b[0::2], 0), b[1::2]
            inbox[tuple(slice(int(u), int(v) + 1) for u, v in zip(blo, bhi))] = True
            bg_seed |= ~inbox
            fg_seed &= inbox
        seeds = np.stack([bg_seed & ~fg_seed, fg_seed]).astype(np.float32)
        cut = numpymaxflow.maxflow_interactive(x[None], np.stack([1.0 - p, p]), seeds, self.lamda, self.sigma, 6)
        cut = np.asarray(cut).reshape(shape) > 0.5
        if m.any() and not (cut & m).any():
            # the cut dropped all of the network's answer (an intensity model learnt from a mask that holds a small
            # part of a bright object: the missed rest teaches "bright = background"): keep the network's answer
            cut = m.copy()
        cut = impose_clicks(cut, fl, bl)
        if cut.any():
            cut = keep_seeded(cut, fg_seed | (cut & m))
        return cut
