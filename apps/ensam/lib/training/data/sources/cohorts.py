"""Sources from multi-subject labelled sets committed to the repository (:mod:`lib.cohorts`), read apart from the
sampler's volumes (``sample-datasets/train``): one structure across many people.

* ``hippocampus``: a training subject of the hippocampus set (136 T2w MR crops of as many people, 1 mm; only the
  ``train`` subjects of its ``split.json``: the ``tune`` and ``loop`` subjects are never read here), one of its
  three structures drawn uniformly (anterior, posterior, or the whole hippocampus: their union). Not in the default
  weights: a recipe draws it with ``source_weights: {hippocampus: 0.1, ...}``. The subjects are loaded on the first
  draw (a few seconds) and kept for the process (:func:`cohort_volumes`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from scipy import ndimage

from ....cohorts import HIPPOCAMPUS_ROOT, HIPPOCAMPUS_STRUCTURES, UNION_VALUE, read_unions, structure_mask, subjects
from ....labels import label_id as vocab_id
from ..augmentation import region_around_slices
from ..volumes import Volume, make_volume
from .registry import register_source

__all__ = ["cohort_volumes", "draw_cohort_structure"]

_LOADED: Dict[Tuple[str, str], List[Volume]] = {}


def cohort_volumes(root=HIPPOCAMPUS_ROOT, split: str = "train", seed: int = 0) -> List[Volume]:
    """The subjects of ``split`` of the set at ``root`` as :class:`Volume` objects (kept for the process), with the
    bounding box of each union (``dataset.json``'s ``unions``) next to those of the labels. Only ``train`` may be
    used for training; the other splits are for tests and tools that look at the data."""
    from ....io.volumes import load_volume  # THE volume loader

    root = Path(root)
    key = (str(root.resolve()), split)
    if key in _LOADED:
        return _LOADED[key]
    keep = set(subjects(split, root))
    meta = json.loads((root / "dataset.json").read_text())
    rng = np.random.default_rng(seed)
    vols = []
    for e in meta["training"]:
        if e["id"] not in keep:
            continue
        img = load_volume(str(root / e["image"]), dtype=np.float32)
        lab = np.asarray(load_volume(str(root / e["label"])).array).astype(np.int16)
        names = {int(k): str(v) for k, v in e["labels"].items()}
        v = make_volume(e["id"], img.array, img.affine, lab, names, e.get("modality", "MR"), rng=rng)
        for value, members in read_unions(e).items():
            union = np.isin(lab, members)
            if union.any():
                v.bboxes[value] = ndimage.find_objects(union.astype(np.int8))[0]
        vols.append(v)
    missing = keep - {v.name for v in vols}
    if missing:
        raise ValueError(f"{root}/dataset.json lacks subjects of split {split!r}: {sorted(missing)[:5]}")
    _LOADED[key] = vols
    return vols


def draw_cohort_structure(sampler, rng, vols: List[Volume], kind: str, structures: Dict[int, str],
                          unions: Dict[int, tuple]):
    """A uniformly drawn subject of ``vols`` and one of its ``structures`` (not in the sampler's holdout), as a
    :class:`Sample` of ``kind`` (``sampler.finish``: the region around it, normalised); None when that subject has
    none of them."""
    v = vols[int(rng.integers(len(vols)))]
    choices = [lab for lab in sorted(structures) if lab in v.bboxes and structures[lab] not in sampler.holdout]
    if not choices:
        return None
    lab = choices[int(rng.integers(len(choices)))]
    region = region_around_slices(v.image.shape, v.bboxes[lab], v.spacing, rng)
    mask = structure_mask(np.asarray(v.labels[region]), lab, unions)
    vid = vocab_id(structures[lab])
    return sampler.finish(v, region, mask, kind, structures[lab], -1 if vid is None else vid)


@register_source("hippocampus")
def hippocampus(sampler, rng):
    vols = cohort_volumes(getattr(sampler, "cohort_root", HIPPOCAMPUS_ROOT), "train")
    return draw_cohort_structure(sampler, rng, vols, "hippocampus", HIPPOCAMPUS_STRUCTURES,
                                 {UNION_VALUE: (1, 2)})
