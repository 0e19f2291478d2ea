"""Pseudo-label sources ("segment anything" objects without a name):

* ``slic`` / ``watershed``: one 3D supervoxel / watershed region of the maps :func:`..segmaps.precompute` attached
  to the volumes (computed once per volume and cached under ``runs/cache``);
* ``window``: the connected component, around a random seed voxel, of a random intensity window.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

try:
    import cc3d
except ImportError:  # pragma: no cover
    cc3d = None

from ..augmentation import region_around, region_around_slices
from ..volumes import norm01
from .registry import register_source


def _segmap_region(sampler, rng, key: str):
    """One valid region of a map whose name starts with ``key``, on a random volume that has maps."""
    cands = [v for v in sampler.volumes if v.segmaps]
    v = cands[rng.integers(len(cands))]
    names = [k for k in v.segmaps if k.startswith(key)]
    seg, valid, slices = v.segmaps[names[rng.integers(len(names))]]
    if len(valid) == 0:
        return None
    s = int(valid[rng.integers(len(valid))])
    region = region_around_slices(v.image.shape, slices[s - 1], v.spacing, rng)
    m = seg[region] == s
    if cc3d is not None:
        m = cc3d.largest_k(m.astype(np.uint8), k=1) > 0
    return sampler.finish(v, region, m, key)


@register_source("slic", needs="segmaps")
def slic(sampler, rng):
    return _segmap_region(sampler, rng, "slic")


@register_source("watershed", needs="segmaps")
def watershed(sampler, rng):
    return _segmap_region(sampler, rng, "watershed")


def _touches_window(m: np.ndarray, region, shape) -> bool:
    """Whether the component ``m`` reaches a face of the window ``region`` that is not a face of the image."""
    for ax in range(3):
        first = np.take(m, 0, axis=ax).any() and region[ax].start > 0
        last = np.take(m, -1, axis=ax).any() and region[ax].stop < shape[ax]
        if first or last:
            return True
    return False


@register_source("window")
def window(sampler, rng):
    """Connected component (6-connectivity) of an intensity window around a random seed's value."""
    v = sampler.volumes[rng.integers(len(sampler.volumes))]
    for _ in range(12):
        c = sampler.pick_seed(v, rng)
        half = np.ceil(rng.uniform(20, 60) / v.spacing).astype(int)
        region = tuple(slice(int(max(0, x - h)), int(min(n, x + h + 1))) for x, h, n in zip(c, half, v.image.shape))
        sub = norm01(v.image[region], v.lo, v.hi)
        sub_s = ndimage.gaussian_filter(sub, rng.uniform(0.5, 1.5))
        loc = tuple(int(x - r.start) for x, r in zip(c, region))
        val = sub_s[loc]
        w = rng.uniform(0.01, 0.06)
        th = (sub_s >= val - w) & (sub_s <= val + w)
        th = ndimage.binary_opening(th, iterations=2)  # cut thin bridges to neighbouring regions
        lab = cc3d.connected_components(th.astype(np.uint8), connectivity=6)
        if lab[loc] == 0:
            continue
        m = lab == lab[loc]
        n = int(m.sum())
        if n * np.prod(v.spacing) < 150 or n > 0.6 * m.size:
            continue
        if _touches_window(m, region, v.image.shape):  # the component must not be cut by the window
            continue
        nz = np.nonzero(m)
        lo = [int(x.min()) + r.start for x, r in zip(nz, region)]
        hi = [int(x.max()) + r.start for x, r in zip(nz, region)]
        big = region_around(v.image.shape, lo, hi, v.spacing, rng)
        full = np.zeros(tuple(s.stop - s.start for s in big), bool)
        off = [r.start - b.start for r, b in zip(region, big)]
        # the window is inside the big region unless clipped; paste the mask where they overlap
        src = tuple(slice(max(0, -o), min(mm, bb.stop - bb.start - o)) for o, mm, bb in zip(off, m.shape, big))
        dst = tuple(slice(o + s.start, o + s.stop) for o, s in zip(off, src))
        full[dst] = m[src]
        if full.any():
            return sampler.finish(v, big, full, "window")
    return None
