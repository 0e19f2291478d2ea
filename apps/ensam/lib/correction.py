"""Conservative corrective steps (issue 27): a correction changes the previous answer only near the click that asks
for the change.

The previous answer is the user's accepted work: a corrective click says "this voxel is wrong", which is evidence
about its neighbourhood, not about the whole object. After a click, the new answer replaces the previous one only
inside a ball around each click that the previous answer contradicts (a foreground click outside it, a background
click inside it: what a corrective click is); outside the balls the previous answer stands.

The ball's radius comes from the data: ``k`` times the click's distance to the previous answer's boundary (in mm:
how deep the click sits in the error it corrects, which is what the evaluator's and a user's click measure) plus
``margin_mm``. A click deep inside a large leak may change a large region; a click near the boundary changes only
its neighbourhood; a background click can never delete an object far beyond its own reach.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["contradicted_clicks", "click_depth_mm", "conservative_merge"]


def contradicted_clicks(prev: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices of the clicks ``prev`` contradicts: foreground clicks outside it, background clicks inside it.
    ``points``: (N, 3) voxel indices of ``prev``'s grid (clicks outside the grid are ignored)."""
    pts = np.round(np.asarray(points, float).reshape(-1, 3)).astype(int)
    labs = np.asarray(labels).reshape(-1)
    inside = np.all((pts >= 0) & (pts < np.asarray(prev.shape)), axis=1)
    out = []
    for i in np.flatnonzero(inside):
        value = bool(prev[tuple(pts[i])])
        if value != bool(labs[i]):
            out.append(i)
    return np.asarray(out, dtype=int)


def _surface(mask: np.ndarray) -> np.ndarray:
    """(M, 3) voxel indices of the boundary voxels of ``mask`` (inside voxels with an outside 6-neighbour)."""
    return np.argwhere(mask & ~ndimage.binary_erosion(mask, border_value=0))


def click_depth_mm(prev: np.ndarray, point, spacing: Sequence[float], surface: Optional[np.ndarray] = None) -> float:
    """Distance (mm) from ``point`` to the boundary of ``prev`` (inf when ``prev`` is empty)."""
    surf = _surface(prev.astype(bool)) if surface is None else surface
    if not len(surf):
        return float("inf")
    d = (surf - np.asarray(point, float)[None]) * np.asarray(spacing, float)[None]
    return float(np.sqrt((d * d).sum(axis=1).min()))


def _balls(shape, centres: np.ndarray, radii_mm: Sequence[float], spacing: np.ndarray) -> np.ndarray:
    """Boolean mask of the union of balls (radii in mm) around ``centres`` (voxel indices)."""
    out = np.zeros(shape, dtype=bool)
    for c, radius in zip(centres, radii_mm):
        lo = np.maximum(np.floor(c - radius / spacing).astype(int), 0)
        hi = np.minimum(np.ceil(c + radius / spacing).astype(int) + 1, shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        grids = np.ogrid[sl]
        d2 = sum(((g - c[ax]) * spacing[ax]) ** 2 for ax, g in enumerate(grids))
        out[sl] |= d2 <= radius * radius
    return out


def _touching(mask: np.ndarray, centres: np.ndarray, reach: int = 2) -> np.ndarray:
    """The 26-connected components of ``mask`` that come within ``reach`` voxels of any of ``centres``."""
    if not mask.any() or not len(centres):
        return np.zeros(mask.shape, dtype=bool)
    lab, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    ids = set()
    for c in np.round(centres).astype(int):
        near = tuple(slice(max(int(x) - reach, 0), int(x) + reach + 1) for x in c)
        ids.update(int(v) for v in np.unique(lab[near]) if v)
    return np.isin(lab, sorted(ids)) if ids else np.zeros(mask.shape, dtype=bool)


def conservative_merge(prev: np.ndarray, new: np.ndarray, points: np.ndarray, labels: np.ndarray,
                       spacing: Sequence[float], k: float = 3.0, margin_mm: float = 3.0,
                       mode: str = "ball", guard: float = 0.3) -> np.ndarray:
    """The new answer where the clicks ``prev`` contradicts ask for a change, ``prev`` elsewhere (uint8, ``prev``'s
    shape). When no click contradicts ``prev`` (nothing asks for a change), or ``prev`` is empty, ``new`` is
    returned unchanged. The ball of a click has radius ``k`` x its distance to ``prev``'s boundary + ``margin_mm``.

    ``mode="ball"``: every change (addition or removal) only inside the balls of the contradicted clicks.
    ``mode="asym"``: removals only inside the balls of the contradicted BACKGROUND clicks (a background click can
    never delete an object far beyond its reach); additions only in the connected added regions that reach a
    contradicted FOREGROUND click (a foreground click may grow the object as far as the image says, but nothing
    appears elsewhere). ``mode="remove"``: removals as in "asym", additions anywhere.
    ``mode="guard"``: ``new`` as it is, unless the changes "asym" would refuse (removals away from the background
    clicks, additions not connected to a foreground click) exceed ``guard`` x the previous answer's volume: then the
    "asym" answer. The network's far changes are kept when they are trims or growths, refused when they delete or
    flood the object (the steps that destroy a good answer).
    ``mode="flood"``: ``new`` as it is, except that additions outside the balls of the contradicted FOREGROUND clicks
    are dropped when they exceed ``guard`` x the previous answer's volume: a foreground click may grow the object
    about as far as it sits from the previous answer, not flood the neighbourhood (removals are left to the
    network: from a lone click the first answer's extent is a guess the background clicks must be free to shrink)."""
    prev_b, new_b = prev.astype(bool), new.astype(bool)
    if prev_b.shape != new_b.shape:
        raise ValueError(f"prev {prev_b.shape} and new {new_b.shape} differ")
    if mode not in ("ball", "asym", "remove", "guard", "flood"):
        raise ValueError(f"mode must be 'ball', 'asym', 'remove', 'guard' or 'flood', got {mode!r}")
    idx = contradicted_clicks(prev_b, points, labels)
    if not prev_b.any() or not len(idx):
        return new_b.astype(np.uint8)
    sp = np.asarray(spacing, float)
    surf = _surface(prev_b)
    pts = np.asarray(points, float).reshape(-1, 3)[idx]
    fg = np.asarray(labels).reshape(-1)[idx].astype(bool)
    radii = [k * click_depth_mm(prev_b, c, sp, surf) + margin_mm for c in pts]
    if mode == "flood":
        if not fg.any():
            return new_b.astype(np.uint8)
        far = new_b & ~prev_b & ~_balls(prev_b.shape, pts[fg], [r for r, f in zip(radii, fg) if f], sp)
        if np.count_nonzero(far) <= guard * np.count_nonzero(prev_b):
            return new_b.astype(np.uint8)
        return (new_b & ~far).astype(np.uint8)
    if mode == "ball":
        allowed = _balls(prev_b.shape, pts, radii, sp)
        return np.where(allowed, new_b, prev_b).astype(np.uint8)
    removable = _balls(prev_b.shape, pts[~fg], [r for r, f in zip(radii, fg) if not f], sp)
    addable = new_b & ~prev_b if mode == "remove" else _touching(new_b & ~prev_b, pts[fg])
    merged = (prev_b & ~(removable & ~new_b)) | (addable & new_b)
    if mode == "guard" and np.count_nonzero(merged != new_b) <= guard * np.count_nonzero(prev_b):
        return new_b.astype(np.uint8)
    return merged.astype(np.uint8)
