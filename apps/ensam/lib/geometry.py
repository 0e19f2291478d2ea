"""Prompt geometry, in ONE place: original voxel index <-> region of interest (ROI) <-> model grid.

Conventions (see docs/ARCHITECTURE.md):
- The image is used as stored: array index ``[i, j, k]``; ``affine`` maps index -> world (mm). No
  reorientation is ever applied, so a client's voxel index needs no orientation handling; only the voxel
  spacing (column norms of the affine) matters, to keep the ROI roughly isotropic in millimetres.
- An ROI is an integer box of original voxels ``[start, start + size)`` per axis; it may extend beyond the
  image (the outside is padded). It is resized to the model grid of shape ``model_shape`` with
  ``align_corners=False`` semantics, so a voxel centre ``i`` maps to the model coordinate
  ``m = (i - start + 0.5) * M / size - 0.5`` and back ``i = (m + 0.5) * size / M - 0.5 + start``.

Everything that converts a prompt or a mask between these spaces calls this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Resize, ScaleIntensity, ScaleIntensityRange

__all__ = ["PromptError", "Roi", "RoiPolicy", "spacing_from_affine", "normalize_boxes", "validate_points",
           "choose_roi", "crop_to_model", "mask_to_model", "logits_to_original", "normalize_intensity"]


class PromptError(ValueError):
    """A prompt that cannot be used (outside the image, malformed, empty). The message says why."""


def spacing_from_affine(affine) -> np.ndarray:
    """Voxel spacing (mm) along each array axis: the column norms of ``affine[:3, :3]``."""
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {a.shape}")
    sp = np.linalg.norm(a[:3, :3], axis=0)
    return np.where(sp > 0, sp, 1.0)


def validate_points(points, shape) -> np.ndarray:
    """(N, 3) voxel indices inside ``shape`` -> float array; PromptError otherwise."""
    if points is None:
        return np.zeros((0, 3))
    p = np.asarray(points, dtype=float)
    if p.size == 0:
        return np.zeros((0, 3))
    if p.ndim != 2 or p.shape[1] != 3 or not np.all(np.isfinite(p)):
        raise PromptError(f"points must be a list of [i, j, k] voxel indices, got {np.asarray(points).tolist()!r}")
    bad = np.any((p < -0.5) | (p > np.asarray(shape) - 0.5), axis=1)
    if bad.any():
        raise PromptError(f"point {p[bad][0].tolist()} is outside the image of shape {list(shape)}")
    return p


def normalize_boxes(boxes, shape) -> np.ndarray:
    """List of ``[i0, i1, j0, j1, k0, k1]`` (inclusive, any order within a pair) -> (K, 6) int array with
    sorted pairs, clipped to the image. A box entirely outside the image, or not 6 numbers, is a PromptError."""
    if boxes is None:
        return np.zeros((0, 6), dtype=int)
    b = np.asarray(boxes, dtype=float)
    if b.size == 0:
        return np.zeros((0, 6), dtype=int)
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 6 or not np.all(np.isfinite(b)):
        raise PromptError(f"a box (roi) must be [i0, i1, j0, j1, k0, k1], got {np.asarray(boxes).tolist()!r}")
    lo = np.minimum(b[:, 0::2], b[:, 1::2])
    hi = np.maximum(b[:, 0::2], b[:, 1::2])
    shp = np.asarray(shape)
    outside = np.any((hi < 0) | (lo > shp - 1), axis=1)
    if outside.any():
        raise PromptError(f"box {b[outside][0].astype(int).tolist()} lies outside the image of shape {list(shape)}")
    lo = np.clip(np.round(lo), 0, shp - 1).astype(int)
    hi = np.clip(np.round(hi), 0, shp - 1).astype(int)
    out = np.empty((len(b), 6), dtype=int)
    out[:, 0::2], out[:, 1::2] = lo, hi
    return out


@dataclass(frozen=True)
class Roi:
    """Integer ROI ``[start, start + size)`` in original voxels, resized to ``model_shape``."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]
    model_shape: tuple[int, int, int]

    @property
    def scale(self) -> np.ndarray:
        """Model voxels per original voxel, per axis."""
        return np.asarray(self.model_shape, float) / np.asarray(self.size, float)

    def to_model(self, points) -> np.ndarray:
        """(N, 3) original voxel indices -> (N, 3) model-grid coordinates (float)."""
        p = np.asarray(points, float).reshape(-1, 3)
        return (p - np.asarray(self.start) + 0.5) * self.scale - 0.5

    def to_original(self, points) -> np.ndarray:
        """(N, 3) model-grid coordinates -> (N, 3) original voxel indices (float)."""
        p = np.asarray(points, float).reshape(-1, 3)
        return (p + 0.5) / self.scale - 0.5 + np.asarray(self.start)

    def boxes_to_model(self, boxes) -> np.ndarray:
        """(K, 6) inclusive original boxes -> (K, 6) model-grid boxes (corner voxel centres mapped)."""
        b = np.asarray(boxes, float).reshape(-1, 6)
        lo = self.to_model(b[:, 0::2])
        hi = self.to_model(b[:, 1::2])
        out = np.empty_like(b)
        out[:, 0::2], out[:, 1::2] = lo, hi
        return out

    def contains(self, lo, hi) -> bool:
        """Whether the voxel box [lo, hi] (inclusive) lies inside this ROI."""
        st = np.asarray(self.start)
        return bool(np.all(np.asarray(lo) >= st) and np.all(np.asarray(hi) <= st + np.asarray(self.size) - 1))

    def touches_border(self, model_mask: np.ndarray, image_shape, width: int = 1) -> bool:
        """Whether a model-grid mask reaches an ROI face that is not also an image face (room to grow)."""
        st, sz = np.asarray(self.start), np.asarray(self.size)
        for ax in range(3):
            sl_lo = [slice(None)] * 3
            sl_lo[ax] = slice(0, width)
            sl_hi = [slice(None)] * 3
            sl_hi[ax] = slice(-width, None)
            if st[ax] > 0 and model_mask[tuple(sl_lo)].any():
                return True
            if st[ax] + sz[ax] < image_shape[ax] and model_mask[tuple(sl_hi)].any():
                return True
        return False

    def enlarged(self, factor: float) -> "Roi":
        """The same centre, ``factor`` times larger along every axis."""
        sz = np.asarray(self.size, float)
        new = np.ceil(sz * factor).astype(int)
        centre = np.asarray(self.start) + sz / 2
        start = np.floor(centre - new / 2).astype(int)
        return Roi(tuple(int(x) for x in start), tuple(int(x) for x in new), self.model_shape)


@dataclass(frozen=True)
class RoiPolicy:
    """How the ROI is chosen from the prompts (sizes in millimetres).

    margin: fraction of the prompt extent added on each side. min_extent / click_extent: smallest ROI edge, and
    the edge used around clicks alone. max_aspect: largest ratio between ROI edges (1 = cube, in mm).
    """

    model_shape: tuple[int, int, int] = (64, 64, 64)
    margin: float = 0.25
    min_extent_mm: float = 32.0
    click_extent_mm: float = 64.0
    max_aspect: float = 2.0


def choose_roi(shape, spacing, boxes=None, fg_points=None, mask=None, policy: RoiPolicy = RoiPolicy()) -> Roi:
    """ROI around the union of the boxes ((K, 6) normalised), the foreground points ((N, 3)) and a mask's
    bounding box. Raises PromptError if there is nothing to centre on."""
    spacing = np.asarray(spacing, float)
    los, his = [], []
    for b in np.asarray(boxes if boxes is not None else np.zeros((0, 6))).reshape(-1, 6):
        los.append(b[0::2])
        his.append(b[1::2])
    fg = np.asarray(fg_points if fg_points is not None else np.zeros((0, 3)), float).reshape(-1, 3)
    has_box = bool(los)
    for p in fg:
        los.append(p)
        his.append(p)
    if mask is not None and np.any(mask):
        nz = np.nonzero(mask)
        los.append(np.array([n.min() for n in nz]))
        his.append(np.array([n.max() for n in nz]))
        has_box = True
    if not los:
        raise PromptError("no prompt: give a box (roi), at least one foreground click, or a previous mask")
    lo, hi = np.min(los, axis=0).astype(float), np.max(his, axis=0).astype(float)
    extent = (hi - lo + 1) * spacing  # mm
    want = extent * (1 + 2 * policy.margin)
    if not has_box:  # clicks only: a fixed field of view around them (AutoZoom grows it if needed)
        want = np.maximum(want, policy.click_extent_mm)
    want = np.maximum(want, policy.min_extent_mm)
    want = np.maximum(want, want.max() / policy.max_aspect)
    size = np.maximum(np.ceil(want / spacing).astype(int), 1)
    centre = (lo + hi) / 2
    start = np.round(centre - (size - 1) / 2).astype(int)
    return Roi(tuple(int(x) for x in start), tuple(int(x) for x in size), tuple(policy.model_shape))


def _crop(volume: np.ndarray, roi: Roi, fill: float) -> np.ndarray:
    """Integer crop of ``volume`` to the ROI, padding the outside with ``fill``."""
    st, sz = np.asarray(roi.start), np.asarray(roi.size)
    shp = np.asarray(volume.shape[:3])
    a, b = np.maximum(st, 0), np.minimum(st + sz, shp)
    out = np.full(tuple(sz), fill, dtype=np.float32)
    if np.all(b > a):
        src = volume[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
        o = a - st
        out[o[0]:o[0] + src.shape[0], o[1]:o[1] + src.shape[1], o[2]:o[2] + src.shape[2]] = src
    return out


def normalize_intensity(x: torch.Tensor) -> torch.Tensor:
    """Modality-agnostic intensity normalisation of a model-grid image: percentiles 0.5..99.5 -> 0..1, clipped;
    min..max -> 0..1 when those percentiles coincide (mostly constant images); zeros for a constant image."""
    lo, hi = torch.quantile(x.flatten()[:: max(1, x.numel() // 200_000)].float(), torch.tensor([0.005, 0.995]))
    if hi - lo > 1e-6 * max(1.0, float(abs(hi))):
        return ScaleIntensityRange(a_min=float(lo), a_max=float(hi), b_min=0.0, b_max=1.0, clip=True)(x)
    if float(x.max() - x.min()) > 0:
        return ScaleIntensity(minv=0.0, maxv=1.0)(x)
    return torch.zeros_like(x)


def crop_to_model(image: np.ndarray, roi: Roi) -> torch.Tensor:
    """Image ROI -> normalised model-grid tensor (1, *model_shape), float32 (padding = image minimum in ROI)."""
    st, sz = np.asarray(roi.start), np.asarray(roi.size)
    shp = np.asarray(image.shape[:3])
    a, b = np.maximum(st, 0), np.minimum(st + sz, shp)
    inside = image[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
    fill = float(inside.min()) if inside.size else 0.0
    crop = torch.from_numpy(_crop(image, roi, fill))[None]
    resized = Resize(roi.model_shape, mode="trilinear", anti_aliasing=False)(crop)
    return normalize_intensity(torch.as_tensor(resized, dtype=torch.float32))


def mask_to_model(mask: np.ndarray, roi: Roi) -> torch.Tensor:
    """Binary original-grid mask -> model-grid soft mask (1, *model_shape) in [0, 1] (trilinear)."""
    crop = torch.from_numpy(_crop(mask.astype(np.float32), roi, 0.0))[None]
    return torch.as_tensor(Resize(roi.model_shape, mode="trilinear", anti_aliasing=False)(crop), dtype=torch.float32)


def logits_to_original(logits: torch.Tensor, roi: Roi, image_shape, out: np.ndarray | None = None,
                       threshold: float = 0.0) -> np.ndarray:
    """Model-grid logits (*model_shape) -> binary mask pasted into ``out`` (original grid, uint8; a new zero
    array if None). Only the ROI's part inside the image is written (it replaces what was there)."""
    if out is None:
        out = np.zeros(tuple(image_shape), dtype=np.uint8)
    st, sz = np.asarray(roi.start), np.asarray(roi.size)
    shp = np.asarray(image_shape)
    a, b = np.maximum(st, 0), np.minimum(st + sz, shp)
    if not np.all(b > a):
        return out
    # resize only the part of the ROI that lies inside the image: sample it with the exact ROI mapping
    x = logits.float().reshape(1, 1, *roi.model_shape)
    full = F.interpolate(x, size=tuple(int(s) for s in sz), mode="trilinear", align_corners=False)[0, 0]
    o0, o1 = a - st, b - st
    part = full[o0[0]:o1[0], o0[1]:o1[1], o0[2]:o1[2]]
    out[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = (part > threshold).cpu().numpy().astype(np.uint8)
    return out
