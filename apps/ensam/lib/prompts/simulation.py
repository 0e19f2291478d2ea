"""Simulated user prompts: a jittered 3D box from a label and the next corrective click.

Both functions are pure NumPy/SciPy (plus ``cc3d`` for connected components) and work on arrays indexed
``[i, j, k]`` exactly as the image file stores them (see docs/ARCHITECTURE.md, "Conventions").

Click rule (as in the CVPR 2025 interactive 3D segmentation challenge evaluator):

1. error = prediction XOR ground truth;
2. keep the largest 26-connected component of the error;
3. Euclidean distance transform of that component in VOXEL units (spacing ignored);
4. click at the voxel of maximal distance (the "deepest" point), ties broken at random with ``rng``;
5. it is a foreground click when the ground truth is set there, a background click otherwise.

Border choice: the component is padded with one voxel of zeros before the distance transform, so the image
border counts as *outside* the error. An error region touching the border therefore has distance 1 on its border
voxels, like on any other boundary, and the click is not pushed against the edge of the volume (this matches
``edt(..., black_border=True)`` in the challenge code). Implementation detail: the transform is computed on the
component's bounding box grown by one voxel on every side (real neighbours where they exist, zero padding where
the box touches the border). This is exact: any background voxel outside that shell is farther from every
component voxel than its projection onto the shell, which is itself background.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
from scipy import ndimage

from ..geometry import mask_bbox  # THE bounding box (re-exported: lib.prompts.mask_bbox)

try:  # cc3d is a hard dependency of the app; the fallback only keeps imports alive in odd environments
    import cc3d
except ImportError:  # pragma: no cover
    cc3d = None

RngLike = Union[None, int, np.random.Generator]

__all__ = ["mask_bbox", "box_from_mask", "next_click"]


def _as_rng(rng: RngLike) -> np.random.Generator:
    """``None`` -> fresh unseeded generator, ``int`` -> seeded generator, ``Generator`` -> itself."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def box_from_mask(mask: np.ndarray, jitter: int = 3, rng: RngLike = None) -> np.ndarray:
    """3D box prompt from a label: its bounding box, each side moved OUTWARD by a random 0..``jitter`` voxels.

    The six offsets are drawn independently (uniform integers in ``[0, jitter]``) from ``rng``, so the result is
    deterministic for a seeded generator. Sides never move inward; the box is clipped to the image.

    Args:
        mask: ``(X, Y, Z)`` binary/label array indexed ``[i, j, k]``; non-zero = the structure.
        jitter: largest outward move per side, in voxels (0 = exact bounding box).
        rng: ``np.random.Generator``, an int seed, or ``None`` (unseeded).

    Returns:
        ``int64`` array ``[i0, i1, j0, j1, k0, k1]``, inclusive voxel indices with ``i0 <= i1`` etc.

    Raises:
        ValueError: empty mask, non-3D mask or negative jitter.
    """
    m = np.asarray(mask)
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    box = mask_bbox(m)
    if box is None:
        raise ValueError("box_from_mask: the mask is empty, there is no structure to put a box around")
    gen = _as_rng(rng)
    move = gen.integers(0, int(jitter) + 1, size=6)
    box[0::2] -= move[0::2]
    box[1::2] += move[1::2]
    upper = np.asarray(m.shape, dtype=np.int64) - 1
    box[0::2] = np.maximum(box[0::2], 0)
    box[1::2] = np.minimum(box[1::2], upper)
    return box


def _largest_component(error: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 26-connected component of a boolean 3D array (non-empty)."""
    if cc3d is not None:
        labels = cc3d.largest_k(error.view(np.uint8), k=1, connectivity=26)
        return labels != 0
    labels, n = ndimage.label(error, structure=np.ones((3, 3, 3), dtype=bool))  # pragma: no cover
    sizes = np.bincount(labels.ravel())  # pragma: no cover
    sizes[0] = 0  # pragma: no cover
    return labels == int(np.argmax(sizes))  # pragma: no cover


def next_click(
    pred: np.ndarray, gt: np.ndarray, rng: RngLike = None
) -> Optional[Tuple[np.ndarray, bool]]:
    """The next simulated corrective click (see the module docstring for the rule).

    Args:
        pred: ``(X, Y, Z)`` current prediction (non-zero = foreground); ``None`` or all zeros before any output.
        gt: ``(X, Y, Z)`` ground truth of the structure (non-zero = foreground), same shape.
        rng: ``np.random.Generator``, an int seed, or ``None`` (unseeded); only used to break ties between
            equally deep voxels.

    Returns:
        ``(point, is_foreground)`` with ``point`` an ``int64`` array ``[i, j, k]`` (voxel index in the given
        arrays) and ``is_foreground`` True when ``gt`` is set at the point (the click adds a missed region) and
        False otherwise (the click removes a false positive); ``None`` when prediction and ground truth agree.
    """
    g = np.asarray(gt) != 0
    if g.ndim != 3:
        raise ValueError(f"gt must be 3D (X, Y, Z), got shape {g.shape}")
    if pred is None:
        error = g
    else:
        p = np.asarray(pred) != 0
        if p.shape != g.shape:
            raise ValueError(f"pred shape {p.shape} != gt shape {g.shape}")
        error = np.logical_xor(p, g)
    if not error.any():
        return None

    # Work on the error's bounding box only: cheap on big, mostly correct volumes.
    box = mask_bbox(error)
    sl = tuple(slice(box[2 * a], box[2 * a + 1] + 1) for a in range(3))
    comp = _largest_component(np.ascontiguousarray(error[sl]))
    cbox = mask_bbox(comp)
    csl = tuple(slice(cbox[2 * a], cbox[2 * a + 1] + 1) for a in range(3))
    # One voxel of zeros around the component's box: every voxel just outside that box is background in the
    # padded image (other error components are not part of the component), so the transform is exact.
    padded = np.pad(comp[csl], 1, mode="constant", constant_values=False)
    dist = ndimage.distance_transform_edt(padded)
    flat = np.flatnonzero(dist == dist.max())
    pick = flat[0] if flat.size == 1 else flat[_as_rng(rng).integers(flat.size)]
    local = np.asarray(np.unravel_index(pick, padded.shape), dtype=np.int64) - 1
    point = local + box[0::2] + cbox[0::2]
    return point, bool(g[tuple(point)])
