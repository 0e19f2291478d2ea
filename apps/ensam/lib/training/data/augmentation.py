"""Regions around an object, resampling and augmentation of a :class:`~.volumes.Sample`.

Every sample is a small region around the object (with enough margin for the ROI that ``geometry.choose_roi``
will draw around it), then strongly augmented: spacing change (incl. thick slices), axis flips and permutations,
random intensity transfer curves, gamma, bias field, blur and noise.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .volumes import Sample

__all__ = ["region_around", "resize", "random_spacing", "resample", "intensity_aug", "augment"]


def region_around(shape, lo, hi, spacing, rng, extra_mm: float = 28.0):
    """Slices around the voxel box [lo, hi] with enough margin for geometry.choose_roi (ROI = extent x 1.5, at
    least 32 mm, aspect <= LoopConfig.roi_max_aspect = 2; 64 mm around clicks), randomly a little more."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    ext_mm = (hi - lo + 1) * spacing
    margin_mm = 0.5 * ext_mm.max() + extra_mm + rng.uniform(0, 12)
    m = np.ceil(margin_mm / spacing).astype(int)
    a = np.maximum(lo - m, 0)
    b = np.minimum(hi + m + 1, np.asarray(shape))
    return tuple(slice(int(x), int(y)) for x, y in zip(a, b))


def region_around_slices(shape, sl, spacing, rng):
    """:func:`region_around` the bounding slices ``sl`` (as ``ndimage.find_objects`` gives them)."""
    return region_around(shape, [s.start for s in sl], [s.stop - 1 for s in sl], spacing, rng)


def resize(x: np.ndarray, size, mode: str) -> np.ndarray:
    """``x`` resampled to ``size`` voxels: ``"nearest"`` (nearest-exact) or trilinear (align_corners=False)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    if mode == "nearest":
        y = F.interpolate(t, size=tuple(int(s) for s in size), mode="nearest-exact")
    else:
        y = F.interpolate(t, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)
    return y[0, 0].numpy()


def random_spacing(spacing, shape, rng, max_voxels: float = 1.2e6, min_mm: float = 0.6) -> np.ndarray:
    """New spacing: isotropic or per-axis zoom in [0.5, 2], sometimes thick slices on one axis; never more than
    ``max_voxels`` voxels for the region."""
    sp = np.asarray(spacing, float)
    fov = sp * np.asarray(shape)
    r = rng.random()
    if r < 0.35:
        new = sp.copy()
    elif r < 0.6:
        new = sp * np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    elif r < 0.8:
        new = sp * np.exp(rng.uniform(np.log(0.6), np.log(1.6), size=3))
    else:  # in-plane fine, one thick axis (like 0.8 x 0.8 x 2.5 mm CT or 1 x 1 x 5 mm MR)
        new = np.full(3, rng.uniform(0.7, 1.6))
        new[rng.integers(3)] = rng.uniform(2.0, 5.0)
    new = np.maximum(new, min_mm)
    vox = np.prod(fov / new)
    if vox > max_voxels:
        new = new * (vox / max_voxels) ** (1 / 3)
    return new


def resample(image, mask, spacing, new_spacing):
    shape = np.asarray(image.shape)
    size = np.maximum(np.round(shape * np.asarray(spacing) / np.asarray(new_spacing)).astype(int), 2)
    if np.all(size == shape):
        return image, mask, np.asarray(spacing, float)
    real_sp = np.asarray(spacing) * shape / size
    img = resize(image, size, "linear")
    m = resize(mask.astype(np.float32), size, "linear") > 0.5
    return img.astype(np.float32), m, real_sp


def intensity_aug(img01: np.ndarray, rng) -> np.ndarray:
    """Random intensity transforms on a [0, 1]-normalised region (MONAI transforms + a random transfer curve)."""
    from monai.transforms import (RandAdjustContrast, RandBiasField, RandGaussianNoise, RandGaussianSmooth,
                                  RandHistogramShift)

    seed = int(rng.integers(2 ** 31))
    t = torch.from_numpy(np.ascontiguousarray(img01))[None]
    if rng.random() < 0.15:  # non-monotonic random transfer curve (MR-like contrast changes, inversions)
        xs = np.linspace(0, 1, 6)
        ys = rng.random(6)
        t = torch.from_numpy(np.interp(t.numpy(), xs, ys).astype(np.float32))
    steps = [RandHistogramShift(num_control_points=(4, 8), prob=0.3),
             RandAdjustContrast(prob=0.3, gamma=(0.6, 1.7)),
             RandBiasField(degree=3, coeff_range=(0.05, 0.35), prob=0.3),
             RandGaussianSmooth(sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2), sigma_z=(0.3, 1.2), prob=0.2),
             RandGaussianNoise(prob=0.35, mean=0.0, std=float(rng.uniform(0.005, 0.06)))]
    for i, tr in enumerate(steps):
        tr.set_random_state(seed + i)
        t = tr(t)
    return np.asarray(t[0], dtype=np.float32)


def augment(sample: Sample, rng, spatial: bool = True, intensity: bool = True) -> Optional[Sample]:
    """Spacing change, flips, axis permutation, intensity transforms. Returns None if the object vanished."""
    img, m, sp = sample.image, sample.mask, np.asarray(sample.spacing, float)
    if spatial:
        img, m, sp = resample(img, m, sp, random_spacing(sp, img.shape, rng))
        if not m.any():
            return None
        perm = rng.permutation(3) if rng.random() < 0.5 else np.arange(3)
        img, m, sp = img.transpose(perm), m.transpose(perm), sp[perm]
        flips = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))
        if flips:
            img, m = np.flip(img, flips), np.flip(m, flips)
        img, m = np.ascontiguousarray(img), np.ascontiguousarray(m)
    if intensity:
        img = intensity_aug(img, rng)
    return Sample(img.astype(np.float32), m, sp, sample.label_id, sample.kind, sample.name)
