"""Simulated user prompts: a jittered 3D box from a label, the next corrective click and the next stroke.

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

from typing import Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra
from skimage.morphology import medial_axis

from ..geometry import mask_bbox  # THE bounding box (re-exported: lib.prompts.mask_bbox)

try:  # cc3d is a hard dependency of the app; the fallback only keeps imports alive in odd environments
    import cc3d
except ImportError:  # pragma: no cover
    cc3d = None

RngLike = Union[None, int, np.random.Generator]

__all__ = ["mask_bbox", "box_from_mask", "next_click", "next_stroke"]


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
    found = _error_component(pred, gt)
    if found is None:
        return None
    g, comp, origin = found
    point = _deepest(comp, rng) + origin
    return point, bool(g[tuple(point)])


def _error_component(pred, gt) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(gt as bool, the largest 26-connected component of ``pred XOR gt`` cropped to its bounding box, the crop's
    origin ``[i, j, k]``), or None when prediction and ground truth agree (``pred`` None = all background)."""
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
    return g, comp[csl], box[0::2] + cbox[0::2]


def _deepest(comp: np.ndarray, rng: RngLike) -> np.ndarray:
    """Index (in ``comp``) of the voxel of ``comp`` farthest from its outside (EDT in voxel units, ties broken with
    ``rng``); the array border counts as outside (see the module docstring)."""
    # One voxel of zeros around the component's box: every voxel just outside that box is background in the
    # padded image (other error components are not part of the component), so the transform is exact.
    padded = np.pad(comp, 1, mode="constant", constant_values=False)
    dist = ndimage.distance_transform_edt(padded)
    flat = np.flatnonzero(dist == dist.max())
    pick = flat[0] if flat.size == 1 else flat[_as_rng(rng).integers(flat.size)]
    return np.asarray(np.unravel_index(pick, padded.shape), dtype=np.int64) - 1


def next_stroke(
    pred: np.ndarray, gt: np.ndarray, rng: RngLike = None, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> Optional[Tuple[np.ndarray, bool]]:
    """The next simulated corrective stroke: a line a user would paint along the middle of the largest error.

    Rule (see the module docstring for steps 1-2):

    1. the largest 26-connected component of ``pred XOR gt`` and its deepest voxel, exactly as :func:`next_click`
       (same ``rng`` use), which says the stroke's kind: foreground when ``gt`` is set there;
    2. the stroke is painted in ONE slice through that voxel, as in a 2D view: of the three axis-aligned slices,
       the one where the component's voxels of that kind, 8-connected to the deepest voxel, cover the largest area
       (mm², ``spacing``);
    3. that cross-section's medial axis (``skimage.morphology.medial_axis``: thinning with ``skeletonize`` left 3
       pixels of a 10 x 10 square) and, of it, the longest path (a user's stroke is one line, not a branched
       axis): geodesic in mm along the axis' 8-neighbour graph (``scipy.sparse.csgraph.dijkstra`` twice: from any
       pixel to the farthest one, and from there to the farthest one).

    Returns ``(voxels, is_foreground)``: ``voxels`` ``(M, 3)`` int64 ``[i, j, k]`` in painting order (a single
    voxel for a one-voxel error), or ``None`` when prediction and ground truth agree."""
    found = _error_component(pred, gt)
    if found is None:
        return None
    g, comp, origin = found
    deep = _deepest(comp, rng)
    is_fg = bool(g[tuple(deep + origin)])
    crop = tuple(slice(int(o), int(o) + n) for o, n in zip(origin, comp.shape))
    kind = comp & (g[crop] == is_fg)
    sp = np.asarray(spacing, dtype=float)
    best = None
    for axis in range(3):
        section = np.take(kind, deep[axis], axis=axis)
        lab, _ = ndimage.label(section, structure=np.ones((3, 3), dtype=bool))
        piece = lab == lab[tuple(np.delete(deep, axis))]
        area = float(piece.sum()) * float(np.prod(np.delete(sp, axis)))
        if best is None or area > best[0]:
            best = (area, axis, piece)
    _, axis, piece = best
    line = medial_axis(np.pad(piece, 1))[1:-1, 1:-1] & piece
    pix = np.argwhere(line if line.any() else piece)
    path = _longest_path(pix, np.delete(sp, axis))
    voxels = np.insert(path, axis, deep[axis], axis=1) + origin
    return voxels.astype(np.int64), is_fg


def _longest_path(pix: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """The longest geodesic path (mm) through 8-connected pixels ``pix`` ``(M, 2)``: from the pixel farthest from
    the first one to the pixel farthest from it (exact on a tree, which a skeleton nearly is)."""
    if len(pix) <= 1:
        return pix
    lo = pix.min(0)
    q = pix - lo
    index = -np.ones(tuple(q.max(0) + 1), dtype=np.int64)
    index[q[:, 0], q[:, 1]] = np.arange(len(q))
    rows, cols, weights = [], [], []
    for step in ((0, 1), (1, -1), (1, 0), (1, 1)):  # each neighbour pair once (undirected graph)
        nb = q + step
        ok = np.all((nb >= 0) & (nb < index.shape), axis=1)
        j = np.full(len(q), -1)
        j[ok] = index[nb[ok, 0], nb[ok, 1]]
        keep = j >= 0
        rows.append(np.flatnonzero(keep))
        cols.append(j[keep])
        weights.append(np.full(int(keep.sum()), float(np.hypot(*(np.asarray(step) * spacing)))))
    graph = csr_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(len(q), len(q)))
    d0 = dijkstra(graph, directed=False, indices=0)
    a = int(np.argmax(np.where(np.isfinite(d0), d0, -1)))
    da, before = dijkstra(graph, directed=False, indices=a, return_predecessors=True)
    b = int(np.argmax(np.where(np.isfinite(da), da, -1)))
    order = [b]
    while order[-1] != a:
        order.append(int(before[order[-1]]))
    return pix[order[::-1]]
