"""Sources from the labelled structures of the training volumes.

* ``real``: a labelled structure (TotalSegmentator labels of the CTs, brain / WM / GM / other of the brain MRs,
  ...), with its vocabulary token id (so it can also train the prompt-free "concept" mode).
* ``synth``: the same structures on images rendered from the label maps with random contrasts (the SynthSeg idea).
  Not in the default weights (recipe v3 drew it at 0.12: ``source_weights: {synth: 0.12, ...}``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..augmentation import region_around_slices
from ..volumes import norm01
from .registry import register_source


@register_source("real", needs="structures")
def real(sampler, rng):
    v, lab, name, vid = sampler.draw_structure(rng)
    region = region_around_slices(v.image.shape, v.bboxes[lab], v.spacing, rng)
    return sampler.finish(v, region, v.structure_mask(lab, region), "real", name, vid)


@register_source("synth", needs="structures")
def synth(sampler, rng):
    """Synthetic contrast: a labelled structure as in ``real``, but the image is rendered from the volume's label
    map in the region: every label value (and the unlabelled tissue) gets a random mean and texture, partial-volume
    blur, then (in :func:`..augmentation.augment`) random spacing / thick slices, bias field and noise, so shape and
    boundary, not one scanner's contrast, tell the structure. With probability 0.5 the unlabelled tissue keeps the
    real image through a random transfer curve."""
    v, lab, name, vid = sampler.draw_structure(rng)
    region = region_around_slices(v.image.shape, v.bboxes[lab], v.spacing, rng)
    lr = np.asarray(v.labels[region])
    n = int(lr.max()) + 1  # look-up tables indexed by label value (label maps are small integers)
    mean = rng.uniform(0.0, 1.0, n).astype(np.float32)
    std = rng.uniform(0.0, 0.08, n).astype(np.float32)
    img = mean[lr] + std[lr] * rng.standard_normal(lr.shape, dtype=np.float32)
    if rng.random() < 0.5:  # unlabelled tissue: the real image through a random curve
        real_img = norm01(np.asarray(v.image[region], np.float32), v.lo, v.hi)
        curve = (np.sort(rng.random(5)) if rng.random() < 0.5 else rng.random(5)).astype(np.float32)
        bg = lr == 0
        img[bg] = np.interp(real_img[bg], np.linspace(0, 1, 5, dtype=np.float32), curve)
    if rng.random() < 0.5:  # partial volume / texture scale
        img = ndimage.gaussian_filter(img, float(rng.uniform(0.4, 1.2)), truncate=2.0)
    m = v.structure_mask(lab, region)
    img = v.lo + np.clip(img, 0, 1) * (v.hi - v.lo)  # back to the volume's units (``finish`` rescales)
    return sampler.finish(v, region, m, "synth", name, vid, image=img.astype(np.float32))
