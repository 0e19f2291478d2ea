"""Metrics of the interactive protocol: Dice (DSC), normalised surface Dice (NSD) and the area under the curve.

All masks are ``(X, Y, Z)`` arrays indexed ``[i, j, k]``; non-zero = foreground. ``spacing`` is the voxel size in
mm along ``i, j, k`` (column norms of the affine).

NSD (Nikolov et al. 2021, as used by the CVPR 2025 interactive challenge) is implemented here with SciPy rather
than with MONAI's ``compute_surface_dice`` so that it works on NumPy arrays without one-hot tensors and is cropped
to the structures for speed. Definition used:

* surface voxels of a mask = mask voxels with at least one 6-neighbour outside the mask; outside the image counts
  as outside (zero padding), so a mask touching the image border has a surface there;
* ``d(p, S)`` = Euclidean distance in mm between voxel centres (with the real, possibly anisotropic spacing);
* ``NSD = (#{p in S_pred: d(p, S_gt) <= tol} + #{g in S_gt: d(g, S_pred) <= tol}) / (|S_pred| + |S_gt|)``.

This is the voxel-counting variant (as in MONAI's ``compute_surface_dice`` with its default, unweighted
boundary), not DeepMind's surfel-area-weighted variant; the two differ by a few hundredths on thin or strongly
anisotropic structures. Both empty -> 1.0; exactly one empty -> 0.0.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..geometry import mask_bbox, spacing_from_affine  # THE ones (spacing_from_affine re-exported)

__all__ = ["dice", "surface_dice", "protocol_nsd", "auc", "spacing_from_affine"]

_CROSS = ndimage.generate_binary_structure(3, 1)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """THE Dice similarity coefficient ``2|P & G| / (|P| + |G|)`` of two masks (non-zero = inside); 1.0 when both
    are empty; ValueError when the shapes differ. Used by evaluation, training validation and active learning."""
    p, g = np.asarray(pred), np.asarray(gt)
    p = p if p.dtype == bool else p != 0
    g = g if g.dtype == bool else g != 0
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch {p.shape} vs {g.shape}")
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)
    return mask & ~eroded


def surface_dice(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance: float = 2.0) -> float:
    """Normalised surface Dice at ``tolerance`` mm (see the module docstring for the exact definition).

    Args:
        pred, gt: ``(X, Y, Z)`` masks of the same shape.
        spacing: voxel size in mm along i, j, k.
        tolerance: distance in mm within which surface voxels count as agreeing.
    """
    p = np.asarray(pred) != 0
    g = np.asarray(gt) != 0
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch {p.shape} vs {g.shape}")
    has_p, has_g = p.any(), g.any()
    if not has_p and not has_g:
        return 1.0
    if not has_p or not has_g:
        return 0.0
    # Crop to the union's bounding box plus one voxel: every surface voxel of either mask is inside, so the
    # distances between surfaces are exact; the one-voxel rim keeps border-touching masks' surfaces (zero padding
    # where the box reaches the image border).
    box = mask_bbox(p | g)
    sl = tuple(slice(int(box[2 * a]), int(box[2 * a + 1]) + 1) for a in range(3))
    p = np.pad(p[sl], 1)
    g = np.pad(g[sl], 1)
    sp = _surface(p)
    sg = _surface(g)
    sampling = np.asarray(spacing, dtype=np.float64)
    d_to_g = ndimage.distance_transform_edt(~sg, sampling=sampling)
    d_to_p = ndimage.distance_transform_edt(~sp, sampling=sampling)
    tol = float(tolerance) + 1e-6
    n_ok = int(np.count_nonzero(d_to_g[sp] <= tol)) + int(np.count_nonzero(d_to_p[sg] <= tol))
    return n_ok / float(np.count_nonzero(sp) + np.count_nonzero(sg))


def protocol_nsd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], dsc: Optional[float] = None,
                 tolerance: float = 2.0, min_dsc: float = 0.2) -> float:
    """NSD as the protocol reports it: computed only when DSC > ``min_dsc`` (0.2), else 0."""
    if dsc is None:
        dsc = dice(pred, gt)
    if dsc <= min_dsc:
        return 0.0
    return surface_dice(pred, gt, spacing, tolerance)


def auc(values: Sequence[float]) -> float:
    """Trapezoidal area under a per-step curve with unit spacing: for the 5 click steps the range is 0..4, so a
    perfect curve gives 4.0. ``values`` = metric after click 1, 2, ... (the box step is NOT included)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return 0.0
    return float(np.sum((v[1:] + v[:-1]) * 0.5))
