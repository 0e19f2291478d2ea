"""The sampler: :class:`ObjectSampler` draws a source by its weight from the registry (:mod:`.sources`), the
source gives a region around one object, then :func:`.augmentation.augment`; and the prompt-free (concept) windows."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from ...contract import Contract
from ...labels import label_id as vocab_id
from .augmentation import augment, intensity_aug, resize
from .sources import SOURCES
from .volumes import Sample, Volume, norm01

__all__ = ["ObjectSampler", "SOURCE_WEIGHTS", "DEFAULT_HOLDOUT", "CONCEPT_SPACING", "CONCEPT_WINDOW"]

# Prompt-free (concept) mode: windows of CONCEPT_WINDOW voxels at CONCEPT_SPACING mm isotropic, the default
# contract's model grid and label spacing (lib.contract: the engine's sliding window uses the same numbers).
CONCEPT_SPACING = Contract().label_spacing_mm
CONCEPT_WINDOW = Contract().model_shape[0]
# Structures never used for training: they are the validation set carved from the training volumes
# (their mirror-image partners stay in training).
DEFAULT_HOLDOUT = ("kidney_left", "vertebrae_L1", "rib_left_9", "iliopsoas_left")
SOURCE_WEIGHTS = {"real": 0.34, "slic": 0.14, "watershed": 0.08, "window": 0.08,
                  "blob": 0.12, "tube": 0.10, "shell": 0.06, "lesion": 0.08}


class ObjectSampler:
    """Draws :class:`Sample` objects from the training volumes (see the package docstring).

    Args:
        volumes: from :func:`load_volumes` (with :func:`precompute` run for the pseudo-label sources).
        holdout: structure names never drawn (the validation structures).
        weights: source -> probability (sources whose needs the volumes do not meet are skipped; a name that is
            not a registered source is an error).
        volume_weights: volume name -> factor on that volume's share of the ``real`` source (default 1; 0 = never
            drawn as a real structure), e.g. to damp atlas parcellations whose borders are not image edges.
        exclude: (volume name, label value) pairs never drawn as real structures (the fine-tuning reference
            guard's held-out structures, :mod:`lib.training.reference_guard`).
    """

    def __init__(self, volumes: Sequence[Volume], holdout: Sequence[str] = DEFAULT_HOLDOUT,
                 weights: Optional[Dict[str, float]] = None, only_holdout: bool = False,
                 volume_weights: Optional[Dict[str, float]] = None, exclude: Sequence = ()) -> None:
        self.volumes = list(volumes)
        held = {(str(n), int(lab)) for n, lab in exclude}  # (volume name, label value) never drawn
        self.holdout = set(holdout)
        self.max_region_voxels = 1.6e6
        w = dict(SOURCE_WEIGHTS if weights is None else weights)
        unknown = sorted(set(w) - set(SOURCES))
        if unknown:
            raise ValueError(f"unknown sample sources {unknown}; registered: {sorted(SOURCES)}")
        # real structures: (volume index, label value, name, vocabulary id)
        self.structures = []
        for vi, v in enumerate(self.volumes):
            for lab, sl in v.bboxes.items():
                name = v.names.get(lab, "")
                if not name or (name in self.holdout) != only_holdout or (v.name, int(lab)) in held:
                    continue
                vid = vocab_id(name)
                self.structures.append((vi, lab, name, -1 if vid is None else vid))
        self.sources = [k for k, p in w.items() if p > 0 and self.has(SOURCES[k].needs)]
        self.p = np.asarray([w[k] for k in self.sources], float)
        self.p /= self.p.sum()
        # a labelled structure is drawn by volume first, with probability ~ sqrt(its structure count), then
        # uniformly within it: a 136-region atlas does not drown a 3-vertebra crop (uniform over structures gave
        # brain parcels 57 % of the real samples once the atlases came in)
        counts = np.bincount([st[0] for st in self.structures], minlength=len(self.volumes)).astype(float)
        self._by_volume = [[i for i, st in enumerate(self.structures) if st[0] == vi] for vi in range(len(counts))]
        unknown = set(volume_weights or {}) - {v.name for v in self.volumes}
        if unknown:
            raise ValueError(f"volume_weights names volumes that are not loaded: {sorted(unknown)}")
        factor = np.asarray([float((volume_weights or {}).get(v.name, 1.0)) for v in self.volumes])
        self._p_volume = np.sqrt(counts) * factor
        if self.structures and self._p_volume.sum() <= 0:
            raise ValueError("volume_weights leave no volume with real structures to draw from")
        self._p_volume /= max(self._p_volume.sum(), 1e-9)

    def has(self, need: str) -> bool:
        """Whether the volumes meet a source's need (:data:`.sources.NEEDS`)."""
        if need == "structures":
            return bool(self.structures)
        if need == "segmaps":
            return any(v.segmaps for v in self.volumes)
        return True

    # -- public ---------------------------------------------------------------------------------------------
    def draw(self, source: str, rng) -> Optional[Sample]:
        """One raw draw of the registered source ``source`` (no augmentation); None when it failed this time or
        the volumes do not meet its need."""
        src = SOURCES[source]
        return src.draw(self, rng) if self.has(src.needs) else None

    def sample(self, rng, source: Optional[str] = None, aug: bool = True, tries: int = 20) -> Sample:
        for _ in range(tries):
            src = source or self.sources[rng.choice(len(self.sources), p=self.p)]
            s = self.draw(src, rng)
            if s is None or s.mask.sum() < 8:
                continue
            if aug:
                s = augment(s, rng)
                if s is None or s.mask.sum() < 8:
                    continue
            return s
        raise RuntimeError(f"could not draw a sample from source {source!r} in {tries} tries")

    def concept_window(self, rng, aug: bool = True, window: int = CONCEPT_WINDOW,
                       spacing_mm: float = CONCEPT_SPACING, p_centred: float = 0.8):
        """A prompt-free training window: a volume resampled to ``spacing_mm`` isotropic, a ``window``^3 box
        (containing the structure with probability ``p_centred``), the structure's mask and vocabulary id.
        Returns (Sample with image/mask of shape (window,)*3, label id)."""
        named = [s for s in self.structures if s[3] >= 0]
        vi, lab, name, vid = named[rng.integers(len(named))]
        v = self.volumes[vi]
        sp = v.spacing
        m_full = v.structure_mask(lab)
        fov_vox = np.ceil(window * spacing_mm / sp).astype(int)  # window in original voxels
        sl = v.bboxes[lab]
        if rng.random() < p_centred:
            lo = np.array([s.start for s in sl])
            hi = np.array([s.stop - 1 for s in sl])
            c = rng.uniform(lo, hi + 1)
        else:
            c = rng.uniform(0, np.asarray(v.image.shape))
        start = np.round(c - fov_vox / 2).astype(int)
        a = np.clip(start, 0, None)
        b = np.minimum(start + fov_vox, np.asarray(v.image.shape))
        fill = float(v.image[v.body].min()) if v.body is not None else float(v.image.min())
        img = np.full(tuple(fov_vox), fill, np.float32)
        msk = np.zeros(tuple(fov_vox), bool)
        o = a - start
        src = tuple(slice(int(x), int(y)) for x, y in zip(a, b))
        dst = tuple(slice(int(x), int(x + (y - z))) for x, y, z in zip(o, b, a))
        img[dst] = v.image[src]
        msk[dst] = m_full[src]
        img = resize(img, (window,) * 3, "linear")
        msk = resize(msk.astype(np.float32), (window,) * 3, "linear") > 0.5
        img = norm01(img, v.lo, v.hi)
        if aug:  # intensity only: flips would swap left/right names (the engine does not reorient either)
            img = intensity_aug(img, rng)
        return Sample(img, msk, np.full(3, spacing_mm), vid, "concept", name), vid

    # -- for the sources ------------------------------------------------------------------------------------
    def draw_structure(self, rng):
        """A labelled structure, by volume first (see ``__init__``): (volume, label value, name, vocabulary id)."""
        members = self._by_volume[rng.choice(len(self._p_volume), p=self._p_volume)]
        vi, lab, name, vid = self.structures[members[rng.integers(len(members))]]
        return self.volumes[vi], lab, name, vid

    def pick_seed(self, v: Volume, rng) -> np.ndarray:
        """A random voxel of ``v``'s body."""
        return v.seeds[rng.integers(len(v.seeds))]

    def finish(self, v: Volume, region, mask, kind, name="", vid=-1, image=None) -> Sample:
        """The sample of ``mask`` in ``region`` of ``v`` (``image``: that region's image when a source repainted
        it), normalised, subsampled when the region has more than ``max_region_voxels`` voxels."""
        img = v.image[region] if image is None else image
        sp = v.spacing.copy()
        stride = int(np.floor((img.size / self.max_region_voxels) ** (1 / 3)))
        if stride > 1:  # a huge region (whole brain at 1 mm) would be resampled to coarser spacing anyway
            img, mask = img[::stride, ::stride, ::stride], mask[::stride, ::stride, ::stride]
            sp = sp * stride
        return Sample(norm01(img, v.lo, v.hi), np.ascontiguousarray(mask), sp, vid, kind, name)
