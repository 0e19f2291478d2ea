"""Synthetic-object sources: ``blob`` / ``tube`` / ``shell`` / ``lesion``, objects with random shape, contrast and
texture pasted into a real volume around a random seed voxel of its body (:mod:`..shapes`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

try:
    import cc3d
except ImportError:  # pragma: no cover
    cc3d = None

from ..augmentation import region_around
from ..shapes import paste, shape_blob, shape_tube
from .registry import register_source

# object size in mm, drawn uniformly: lesions are small, tubes long, blobs and shells in between
SIZE_MM = {"lesion": (3.0, 10.0), "tube": (15.0, 50.0), "blob": (6.0, 35.0), "shell": (6.0, 35.0)}


def _object(kind: str, shape, sp, centre, size_mm, rng, sub):
    """(object mask, region with the object's surroundings repainted where needed) in the local box."""
    if kind == "tube":
        return shape_tube(shape, sp, centre, 2 * size_mm, rng), sub
    if kind == "shell":
        blob = shape_blob(shape, sp, centre, size_mm, rng, irregular=0.2)
        t = max(1, int(round(rng.uniform(1.0, 4.0) / sp.min())))
        inner = ndimage.binary_erosion(blob, iterations=t)
        if rng.random() < 0.5 and inner.any():  # the inside gets its own contrast (a cyst with a wall)
            sub = paste(sub, inner, rng)
        return blob & ~inner, sub
    if kind == "lesion":
        return shape_blob(shape, sp, centre, size_mm, rng, irregular=0.25), sub
    return shape_blob(shape, sp, centre, size_mm, rng), sub


def draw_object(sampler, rng, kind: str):
    v = sampler.volumes[rng.integers(len(sampler.volumes))]
    c = sampler.pick_seed(v, rng)
    sp = v.spacing
    size_mm = rng.uniform(*SIZE_MM[kind])
    lo = c - np.ceil(size_mm * 1.6 / sp).astype(int)
    hi = c + np.ceil(size_mm * 1.6 / sp).astype(int)
    region = region_around(v.image.shape, np.maximum(lo, 0), np.minimum(hi, np.asarray(v.image.shape) - 1), sp, rng)
    img = v.image[region].astype(np.float32)
    # the object is drawn and pasted in a local box around its centre (cheap), inside the region
    cr = np.asarray([x - r.start for x, r in zip(c, region)])
    half = np.ceil(size_mm * 1.7 / sp).astype(int) + 2
    a = np.maximum(cr - half, 0)
    b = np.minimum(cr + half + 1, np.asarray(img.shape))
    loc = tuple(slice(int(x), int(y)) for x, y in zip(a, b))
    shape = tuple(int(y - x) for x, y in zip(a, b))
    centre = (cr - a).astype(float)
    paint, sub = _object(kind, shape, sp, centre, size_mm, rng, img[loc])
    m = paint
    if cc3d is not None and m.any():
        m = cc3d.largest_k(m.astype(np.uint8), k=1, connectivity=26) > 0
    if m.sum() < 8:
        return None
    img[loc] = paste(sub, paint, rng)
    full = np.zeros(img.shape, bool)
    full[loc] = m
    return sampler.finish(v, region, full, kind, image=img)


def _source(kind: str):
    def draw(sampler, rng):
        return draw_object(sampler, rng, kind)

    draw.__name__ = draw.__qualname__ = kind
    return draw


for _kind in SIZE_MM:  # blob, tube, shell, lesion: one shape family, registered under each kind
    register_source(_kind)(_source(_kind))
