"""Loading the training volumes: :class:`Volume` (image, labels, body mask, seed voxels, intensity range, label
bounding boxes), :class:`Sample` (what every source returns) and the intensity normalisation of a region."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from scipy import ndimage

try:
    import cc3d
except ImportError:  # pragma: no cover
    cc3d = None

from ...geometry import spacing_from_affine

__all__ = ["Volume", "Sample", "TRAIN_ROOT", "BRAIN", "load_volumes", "make_volume", "norm01"]

TRAIN_ROOT = "sample-datasets/train"
BRAIN = 1000  # the label value of "brain" (union of every brain label) added to MR volumes with WM and GM


@dataclass
class Volume:
    """One training volume as stored (no reorientation). ``labels`` 0 = background; ``names`` label -> name."""

    name: str
    image: np.ndarray
    affine: np.ndarray
    labels: Optional[np.ndarray] = None
    names: Dict[int, str] = field(default_factory=dict)
    modality: str = ""
    body: Optional[np.ndarray] = None        # bool, where objects may be seeded
    seeds: Optional[np.ndarray] = None       # (N, 3) random voxel indices inside ``body``
    bboxes: Dict[int, tuple] = field(default_factory=dict)  # label -> slices
    segmaps: Dict[str, tuple] = field(default_factory=dict)  # name -> (label map, valid ids, slices list)
    lo: float = 0.0                          # intensity percentiles 0.5 / 99.5 inside the body
    hi: float = 1.0

    @property
    def spacing(self) -> np.ndarray:
        return spacing_from_affine(self.affine)

    def structure_mask(self, lab: int, region=None) -> np.ndarray:
        """The binary mask of label ``lab`` (:data:`BRAIN` = every label) in ``region`` (slices; None = all)."""
        lr = self.labels if region is None else self.labels[region]
        return (lr > 0) if lab == BRAIN else (lr == lab)


@dataclass
class Sample:
    image: np.ndarray          # (X, Y, Z) float32
    mask: np.ndarray           # (X, Y, Z) bool, non-empty
    spacing: np.ndarray        # (3,) mm
    label_id: int = -1         # vocabulary token id, -1 = no name
    kind: str = ""
    name: str = ""


def _check_not_eval(path: Path) -> None:
    if "eval" in {p.lower() for p in path.resolve().parts}:
        raise ValueError(f"refusing to read {path}: evaluation data must never be used for training")


def _body_mask(image: np.ndarray, modality: str) -> np.ndarray:
    """Rough foreground (patient / head) mask: above an air threshold, largest component, holes filled."""
    if modality.upper() == "CT":
        fg = image > -500
    else:
        fg = image > np.percentile(image, 99) * 0.08
    fg = ndimage.binary_opening(fg, iterations=1)
    if cc3d is not None and fg.any():
        fg = cc3d.largest_k(fg.astype(np.uint8), k=1) > 0
    return ndimage.binary_fill_holes(fg)


def load_volumes(root: str | os.PathLike = TRAIN_ROOT, with_body: bool = True, seed: int = 0) -> List[Volume]:
    """Volumes listed in ``<root>/dataset.json`` (``training`` entries; ``image`` / ``label`` / ``modality`` /
    ``labels``). Never reads an evaluation folder."""
    from ...io.volumes import load_volume  # THE volume loader

    root = Path(root)
    _check_not_eval(root)
    meta = json.loads((root / "dataset.json").read_text())
    rng = np.random.default_rng(seed)
    out = []
    for entry in meta.get("training", []):
        ipath = root / entry["image"]
        _check_not_eval(ipath)
        img = load_volume(str(ipath), dtype=np.float32)
        labels = None
        if entry.get("label"):
            labels = load_volume(str(root / entry["label"])).array.astype(np.int16)
        names = {int(k): str(v) for k, v in (entry.get("labels") or {}).items()}
        vol = make_volume(Path(entry["image"]).name.split(".")[0], img.array, img.affine, labels,
                          names, entry.get("modality", ""), with_body=with_body, rng=rng)
        out.append(vol)
    return out


def make_volume(name: str, image: np.ndarray, affine, labels: Optional[np.ndarray] = None,
                names: Optional[Dict[int, str]] = None, modality: str = "", with_body: bool = True,
                rng=None) -> Volume:
    """A :class:`Volume` with its body mask, seed voxels, intensity range and label bounding boxes. ``modality``
    '' = guessed ('CT' when the image has air below -500, else 'MR')."""
    rng = np.random.default_rng(0) if rng is None else rng
    image = np.asarray(image, dtype=np.float32)
    if not modality:
        modality = "CT" if float(image.min()) < -500 else "MR"
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != image.shape:
            raise ValueError(f"{name}: label shape {labels.shape} != image shape {image.shape}")
        labels = labels.astype(np.int16 if labels.max() < 32767 else np.int32)
    names = dict(names or {})
    vol = Volume(name, image, np.asarray(affine, float), labels, names, modality)
    if with_body:
        vol.body = _body_mask(image, modality)
        if not vol.body.any():
            vol.body = np.ones(image.shape, bool)
        idx = np.flatnonzero(vol.body)
        pick = rng.choice(idx, size=min(20000, idx.size), replace=False)
        vol.seeds = np.stack(np.unravel_index(pick, image.shape), axis=1)
        vol.lo, vol.hi = (float(v) for v in np.percentile(image[vol.body], [0.5, 99.5]))
    else:
        vol.lo, vol.hi = (float(v) for v in np.percentile(image, [0.5, 99.5]))
    if labels is not None:
        for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is not None:
                vol.bboxes[lab] = sl
        if modality.upper() == "MR" and set(names.values()) >= {"white_matter", "grey_matter"}:
            vol.names = {**names, BRAIN: "brain"}
            vol.bboxes[BRAIN] = ndimage.find_objects((labels > 0).astype(np.int8))[0]
    return vol


def norm01(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``image`` mapped linearly from [lo, hi] to [0, 1] and clipped, float32."""
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
