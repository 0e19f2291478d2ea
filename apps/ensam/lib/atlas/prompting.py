"""Prompts for the interactive model from a fused atlas mask: its box, foreground clicks where the atlases agree
and background clicks inside the box where none of them sees the structure.

Clicks are the deepest voxels (largest distance to the region's border, in mm) of the region, taken one after the
other with the neighbourhood of each chosen click excluded, so that several clicks spread over the structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
from scipy import ndimage

from lib.geometry import mask_bbox

from .fusion import Fused


@dataclass
class Prompts:
    box: Optional[List[int]]  # [i0, i1, j0, j1, k0, k1] or None (nothing propagated)
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=int))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))

    @property
    def empty(self) -> bool:
        return self.box is None

    def summary(self) -> dict:
        return {"box": self.box, "foreground": int(np.sum(self.point_labels == 1)),
                "background": int(np.sum(self.point_labels == 0))}


def deepest_points(region: np.ndarray, spacing, n: int, min_depth_mm: float = 0.0) -> np.ndarray:
    """Up to ``n`` voxels of ``region``, each the deepest one left after excluding a ball (radius = its depth,
    at least 10 mm) around the ones already chosen; points shallower than ``min_depth_mm`` are not taken."""
    region = np.asarray(region, dtype=bool)
    if n <= 0 or not region.any():
        return np.zeros((0, 3), dtype=int)
    sl = ndimage.find_objects(region.astype(np.uint8))[0]  # work inside the region's bounding box
    sub = np.pad(region[sl], 1)  # a border of background: a region touching the image edge still has depth
    depth = ndimage.distance_transform_edt(sub, sampling=spacing)[1:-1, 1:-1, 1:-1]
    spacing = np.asarray(spacing, dtype=float)
    grid = np.indices(depth.shape, dtype=np.float32)
    out = []
    for _ in range(n):
        idx = np.unravel_index(int(np.argmax(depth)), depth.shape)
        d = float(depth[idx])
        if d <= 0 or d < min_depth_mm:
            break
        out.append([s.start + int(i) for s, i in zip(sl, idx)])
        r = max(d, 10.0)
        dist2 = sum(((grid[a] - idx[a]) * spacing[a]) ** 2 for a in range(3))
        depth[dist2 <= r * r] = 0
    return np.asarray(out, dtype=int).reshape(-1, 3)


def prompts_from_fused(fused: Fused, spacing, n_fg: int = 2, n_bg: int = 2, margin: int = 1) -> Prompts:
    """Box of the fused mask (grown by ``margin`` voxels, clipped to the image), ``n_fg`` foreground clicks in
    the consensus (the fused mask when the atlases share no voxel), ``n_bg`` background clicks inside the box
    where no atlas claims the structure (only ones at least 2 voxels deep, so a click is not on a border)."""
    box = mask_bbox(fused.mask)
    if box is None:
        return Prompts(None)
    shape = fused.mask.shape
    box = box.astype(int)
    box[0::2] = np.maximum(box[0::2] - margin, 0)
    box[1::2] = np.minimum(box[1::2] + margin, np.asarray(shape) - 1)
    core = fused.consensus if fused.consensus.any() else fused.mask
    fg = deepest_points(core, spacing, n_fg)
    inside = np.zeros(shape, dtype=bool)
    inside[box[0]:box[1] + 1, box[2]:box[3] + 1, box[4]:box[5] + 1] = True
    outside = inside & (fused.probability <= 0)
    bg = deepest_points(outside, spacing, n_bg, min_depth_mm=2.0 * float(np.max(spacing)))
    pts = np.concatenate([fg, bg]).astype(int).reshape(-1, 3)
    labels = np.concatenate([np.ones(len(fg), dtype=int), np.zeros(len(bg), dtype=int)])
    return Prompts([int(v) for v in box], pts, labels)
