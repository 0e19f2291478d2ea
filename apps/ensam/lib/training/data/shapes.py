"""Synthetic objects for the ``blob`` / ``tube`` / ``shell`` / ``lesion`` sources: random smooth shapes in mm and
their pasting into a real region with random contrast and texture."""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

__all__ = ["shape_blob", "shape_tube", "paste"]


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _smooth_noise(shape, sigma, rng) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def _coords_mm(shape, spacing, centre):
    axes = [(np.arange(s) - c) * d for s, c, d in zip(shape, centre, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def shape_blob(shape, spacing, centre, radius_mm, rng, irregular: float = 0.35) -> np.ndarray:
    """Ellipsoid with random axes and orientation, its surface perturbed by smooth noise."""
    x = _coords_mm(shape, spacing, centre) @ _random_rotation(rng)
    axes = radius_mm * rng.uniform(0.5, 1.3, size=3)
    r = np.sqrt(((x / axes) ** 2).sum(-1))
    sigma = np.maximum(radius_mm * 0.4 / np.asarray(spacing), 1.0)
    return r + irregular * rng.uniform(0.2, 1.0) * _smooth_noise(shape, sigma, rng) < 1.0


def shape_tube(shape, spacing, centre, length_mm, rng) -> np.ndarray:
    """Tube of smoothly varying radius (1.5 .. 7 mm) along a random smooth curve through ``centre``."""
    n = max(8, int(length_mm / 1.0))
    d = rng.normal(size=3)
    d /= np.linalg.norm(d)
    turn = rng.uniform(0.02, 0.15)
    pts = [np.zeros(3)]
    for _ in range(n):
        d = d + rng.normal(size=3) * turn
        d /= np.linalg.norm(d)
        pts.append(pts[-1] + d * 1.0)
    pts = np.asarray(pts) - np.mean(pts, axis=0)
    r0 = rng.uniform(1.5, 6.0)
    radius = np.clip(r0 * np.exp(np.cumsum(rng.normal(0, 0.03, len(pts)))), 1.2, 7.0)
    vox = np.round(pts / np.asarray(spacing) + np.asarray(centre)).astype(int)
    inside = np.all((vox >= 0) & (vox < np.asarray(shape)), axis=1)
    grid = np.ones(shape, dtype=bool)
    rad_map = np.zeros(shape, dtype=np.float32)
    vox, radius = vox[inside], radius[inside]
    if len(vox) == 0:
        return np.zeros(shape, dtype=bool)
    grid[tuple(vox.T)] = False
    rad_map[tuple(vox.T)] = radius
    dist, idx = ndimage.distance_transform_edt(grid, sampling=spacing, return_indices=True)
    return dist <= rad_map[tuple(idx)]


def paste(image: np.ndarray, mask: np.ndarray, rng, paint: Optional[np.ndarray] = None) -> np.ndarray:
    """Blend an object with random contrast and texture into ``image`` (a region, modified copy returned).
    ``paint`` (default ``mask``) is where intensity changes; its edge is softened."""
    paint = mask if paint is None else paint
    lo, hi = np.percentile(image, [2, 98])
    scale = max(hi - lo, 1e-3)
    around = image[ndimage.binary_dilation(paint, iterations=2) & ~paint]
    base = float(np.median(around)) if around.size else float(np.median(image))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if base + 0.3 * scale > hi:
        sign = -1.0
    elif base - 0.3 * scale < lo:
        sign = 1.0
    target = base + sign * rng.uniform(0.12, 0.8) * scale
    tex = _smooth_noise(image.shape, rng.uniform(0.5, 2.5), rng) * rng.uniform(0.0, 0.12) * scale
    keep = rng.uniform(0.0, 0.5)
    alpha = ndimage.gaussian_filter(paint.astype(np.float32), rng.uniform(0.3, 1.0))
    alpha = np.maximum(alpha, paint * rng.uniform(0.85, 1.0))
    obj = target + tex + keep * (image - base)
    return (image * (1 - alpha) + obj * alpha).astype(np.float32)

