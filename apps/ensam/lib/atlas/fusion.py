"""Fusion of atlas masks propagated onto one image, and the atlases' agreement as a confidence.

``fuse`` takes the boolean masks that several atlases give for ONE structure (on the new image's grid) and
returns the weighted vote (a probability map), the fused mask (vote >= ``threshold``), the consensus (every
atlas agrees) and the agreement (mean pairwise Dice between the atlases). ``staple`` is SimpleITK's STAPLE for
when enough atlases carry a structure for it to estimate each one's reliability.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import List, Optional, Sequence

import numpy as np

from lib.evaluation.metrics import dice


@dataclass
class Fused:
    probability: np.ndarray  # float32 (X, Y, Z): weighted share of atlases that say "inside"
    mask: np.ndarray  # bool: probability >= threshold
    consensus: np.ndarray  # bool: every atlas says "inside"
    agreement: Optional[float]  # mean pairwise Dice between the atlases' masks (None with one atlas)
    atlases: int

    @property
    def disagreement(self) -> Optional[float]:
        return None if self.agreement is None else 1.0 - self.agreement


def pairwise_agreement(masks: Sequence[np.ndarray]) -> Optional[float]:
    """Mean Dice over all pairs of masks (None for fewer than two). Two empty masks agree (Dice 1)."""
    if len(masks) < 2:
        return None
    return float(np.mean([dice(a, b) for a, b in combinations(masks, 2)]))


def fuse(masks: Sequence[np.ndarray], weights: Optional[Sequence[float]] = None, threshold: float = 0.5) -> Fused:
    """Weighted majority vote of boolean masks of the same shape. With two atlases and the default threshold,
    a voxel one of them claims is inside (the union): the interactive model then trims it on the image."""
    if not masks:
        raise ValueError("fuse needs at least one mask")
    w = np.ones(len(masks)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(masks),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {len(masks)} non-negative numbers, not all zero")
    w = w / w.sum()
    prob = np.zeros(np.shape(masks[0]), dtype=np.float32)
    consensus = np.ones(np.shape(masks[0]), dtype=bool)
    for m, wi in zip(masks, w):
        m = np.asarray(m, dtype=bool)
        prob += np.float32(wi) * m
        consensus &= m
    return Fused(prob, prob >= threshold - 1e-6, consensus, pairwise_agreement(list(masks)), len(masks))


def local_weights(target: np.ndarray, warped: Sequence[np.ndarray], sigma_vox: float = 2.0,
                  power: float = 1.0, eps: float = 1e-3) -> List[np.ndarray]:
    """Per-voxel weight of each atlas: the inverse of its local intensity mismatch with the target,
    ``(G_sigma * (target - atlas)^2 + eps) ** -power`` (locally weighted voting, Artaechevarria et al. 2009), for
    intensities already on a common scale (``registration.robust_intensities``: 0..1)."""
    from scipy import ndimage

    t = np.asarray(target, dtype=np.float32)
    out = []
    for a in warped:
        d = ndimage.gaussian_filter((t - np.asarray(a, dtype=np.float32)) ** 2, sigma_vox)
        out.append((d + eps) ** -float(power))
    return out


def fuse_local(masks: Sequence[np.ndarray], weight_maps: Sequence[np.ndarray], threshold: float = 0.5) -> Fused:
    """Vote of boolean masks with per-voxel weights (``local_weights``); otherwise as :func:`fuse`."""
    if not masks or len(weight_maps) != len(masks):
        raise ValueError("fuse_local needs one weight map per mask")
    total = np.zeros(np.shape(masks[0]), dtype=np.float32)
    prob = np.zeros_like(total)
    consensus = np.ones(np.shape(masks[0]), dtype=bool)
    for m, w in zip(masks, weight_maps):
        m = np.asarray(m, dtype=bool)
        total += w
        prob += w * m
        consensus &= m
    prob /= np.maximum(total, 1e-12)
    return Fused(prob, prob >= threshold - 1e-6, consensus, pairwise_agreement(list(masks)), len(masks))


def staple(masks: Sequence[np.ndarray], threshold: float = 0.5) -> np.ndarray:
    """SimpleITK's STAPLE estimate of the true mask from several raters (float probability map)."""
    import SimpleITK as sitk

    images: List = [sitk.GetImageFromArray(np.asarray(m, dtype=np.uint8)) for m in masks]
    prob = sitk.STAPLE(images, 1.0)
    return sitk.GetArrayFromImage(prob).astype(np.float32)
