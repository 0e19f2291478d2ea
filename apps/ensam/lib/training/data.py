"""Training data: (image, spacing, binary object mask) samples drawn from the real training volumes.

Sources (all on the volumes of ``sample-datasets/train``; the evaluation volumes are never read):

* ``real``: a labelled structure (TotalSegmentator labels of the small CT, brain / WM / GM / other of MNI152),
  with its vocabulary token id (so it can also train the prompt-free "concept" mode).
* ``synth``: the same structures on images rendered from the label maps with random contrasts (SynthSeg idea).
* ``slic`` / ``watershed``: "segment anything" pseudo-labels, one 3D supervoxel / watershed region (computed once
  per volume and cached under ``runs/cache``).
* ``window``: the connected component, around a random seed voxel, of a random intensity window.
* ``blob`` / ``tube`` / ``shell`` / ``lesion``: synthetic objects with random contrast and texture pasted into a
  real volume.

Every sample is a small region around the object (with enough margin for the ROI that ``geometry.choose_roi``
will draw around it), then strongly augmented: spacing change (incl. thick slices), axis flips and permutations,
random intensity transfer curves, gamma, bias field, blur and noise. The interaction simulation (ROI, box, clicks)
happens in :mod:`lib.training.loop`, with the same geometry functions as the inference engine.

A sample: :class:`Sample` (image (X, Y, Z) float32, mask (X, Y, Z) bool, spacing (3,) mm, label_id, kind).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

try:
    import cc3d
except ImportError:  # pragma: no cover
    cc3d = None

from ..geometry import spacing_from_affine
from ..labels import label_id as vocab_id

__all__ = ["Volume", "Sample", "load_volumes", "ObjectSampler", "augment", "SOURCE_WEIGHTS", "DEFAULT_HOLDOUT",
           "TRAIN_ROOT", "CONCEPT_SPACING", "CONCEPT_WINDOW"]

TRAIN_ROOT = "sample-datasets/train"
CACHE_DIR = "runs/cache"
# Prompt-free (concept) mode: windows of CONCEPT_WINDOW voxels at CONCEPT_SPACING mm isotropic (the engine's
# sliding window uses the same numbers).
CONCEPT_SPACING = 3.0
CONCEPT_WINDOW = 64
# Structures never used for training: they are the validation set carved from the training volumes
# (their mirror-image partners stay in training).
DEFAULT_HOLDOUT = ("kidney_left", "vertebrae_L1", "rib_left_9", "iliopsoas_left")
SOURCE_WEIGHTS = {"real": 0.34, "slic": 0.14, "watershed": 0.08, "window": 0.08,
                  "blob": 0.12, "tube": 0.10, "shell": 0.06, "lesion": 0.08}


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


@dataclass
class Sample:
    image: np.ndarray          # (X, Y, Z) float32
    mask: np.ndarray           # (X, Y, Z) bool, non-empty
    spacing: np.ndarray        # (3,) mm
    label_id: int = -1         # vocabulary token id, -1 = no name
    kind: str = ""
    name: str = ""


# ----------------------------------------------------------------------------------------------------------------
# loading and per-volume precomputation
# ----------------------------------------------------------------------------------------------------------------

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
    from ..io.volumes import load_volume  # THE volume loader

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
            vol.names = {**names, 1000: "brain"}  # 1000 = union of all brain labels
            vol.bboxes[1000] = ndimage.find_objects((labels > 0).astype(np.int8))[0]
    return vol


def _norm01(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def _segmap_valid(seg: np.ndarray, body: np.ndarray, spacing, min_mm3=300.0, max_frac=0.5):
    """Valid region ids (mostly inside the body, not tiny, not huge) and their bounding slices."""
    n = int(seg.max())
    counts = np.bincount(seg.ravel(), minlength=n + 1)
    inside = np.bincount(seg.ravel(), weights=body.ravel().astype(np.float64), minlength=n + 1)
    vox = float(np.prod(spacing))
    total = float(body.sum())
    ok = [i for i in range(1, n + 1) if counts[i] * vox >= min_mm3 and inside[i] >= 0.9 * counts[i]
          and counts[i] <= max_frac * total]
    return np.asarray(ok, dtype=np.int64), ndimage.find_objects(seg)


def _compute_segmaps(vol: Volume, rng_seed: int = 0) -> Dict[str, np.ndarray]:
    """SLIC supervoxels at two scales and compact watershed regions, on a soft-tissue-normalised image
    (computed at <= ~1.5 M voxels and upsampled by nearest neighbour)."""
    from skimage.segmentation import slic, watershed
    from skimage.filters import sobel

    sp = vol.spacing
    img = _norm01(vol.image, vol.lo, vol.hi)
    if vol.modality.upper() == "CT":  # soft-tissue window: organs differ there
        img = np.clip((vol.image + 200.0) / 500.0, 0, 1).astype(np.float32)
    factor = max(1, int(np.ceil((img.size / 1.5e6) ** (1 / 3))))
    small = img[::factor, ::factor, ::factor]
    body_s = vol.body[::factor, ::factor, ::factor]
    sp_s = sp * factor
    body_mm3 = float(body_s.sum() * np.prod(sp_s))
    out = {}
    for name, edge_mm in (("slic_fine", 14.0), ("slic_coarse", 30.0)):
        n_seg = int(max(8, body_mm3 / edge_mm ** 3))
        seg = slic(small, n_segments=n_seg, compactness=0.08, channel_axis=None, spacing=sp_s, mask=body_s,
                   start_label=1, enforce_connectivity=True)
        out[name] = seg.astype(np.int32)
    grad = sobel(ndimage.gaussian_filter(small, 1.0))
    n_mark = int(max(8, body_mm3 / 22.0 ** 3))
    ws = watershed(grad, markers=n_mark, compactness=0.001, mask=body_s)
    out["watershed"] = ws.astype(np.int32)
    if factor > 1:
        for k, v in out.items():
            up = np.repeat(np.repeat(np.repeat(v, factor, 0), factor, 1), factor, 2)
            out[k] = np.ascontiguousarray(up[: img.shape[0], : img.shape[1], : img.shape[2]])
    return out


def precompute(volumes: Sequence[Volume], cache_dir: str | os.PathLike = CACHE_DIR, log=print) -> None:
    """Attach the pseudo-label maps to every volume, computing them once and caching them as ``.npz``."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    for vol in volumes:
        key = hashlib.sha1(vol.image.tobytes()[:: max(1, vol.image.nbytes // 2_000_000)]).hexdigest()[:12]
        path = cache / f"segmaps_v1_{vol.name}_{key}.npz"
        if path.exists():
            maps = dict(np.load(path))
        else:
            t = time.time()
            maps = _compute_segmaps(vol)
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, **maps)
            os.replace(tmp, path)
            log(f"[data] supervoxels for {vol.name}: {time.time() - t:.1f} s -> {path}")
        for name, seg in maps.items():
            valid, slices = _segmap_valid(seg, vol.body, vol.spacing)
            vol.segmaps[name] = (seg, valid, slices)


# ----------------------------------------------------------------------------------------------------------------
# regions, resampling, augmentation
# ----------------------------------------------------------------------------------------------------------------

def _region(shape, lo, hi, spacing, rng, extra_mm: float = 28.0):
    """Slices around the voxel box [lo, hi] with enough margin for geometry.choose_roi (ROI = extent x 1.5, at
    least 32 mm, aspect <= LoopConfig.roi_max_aspect = 2; 64 mm around clicks), randomly a little more."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    ext_mm = (hi - lo + 1) * spacing
    margin_mm = 0.5 * ext_mm.max() + extra_mm + rng.uniform(0, 12)
    m = np.ceil(margin_mm / spacing).astype(int)
    a = np.maximum(lo - m, 0)
    b = np.minimum(hi + m + 1, np.asarray(shape))
    return tuple(slice(int(x), int(y)) for x, y in zip(a, b))


def _resize(x: np.ndarray, size, mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    if mode == "nearest":
        y = F.interpolate(t, size=tuple(int(s) for s in size), mode="nearest-exact")
    else:
        y = F.interpolate(t, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)
    return y[0, 0].numpy()


def random_spacing(spacing, shape, rng, max_voxels: float = 1.2e6, min_mm: float = 0.6) -> np.ndarray:
    """New spacing: isotropic or per-axis zoom in [0.5, 2], sometimes thick slices on one axis; never more than
    ``max_voxels`` voxels for the region."""
    sp = np.asarray(spacing, float)
    fov = sp * np.asarray(shape)
    r = rng.random()
    if r < 0.35:
        new = sp.copy()
    elif r < 0.6:
        new = sp * np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    elif r < 0.8:
        new = sp * np.exp(rng.uniform(np.log(0.6), np.log(1.6), size=3))
    else:  # in-plane fine, one thick axis (like 0.8 x 0.8 x 2.5 mm CT or 1 x 1 x 5 mm MR)
        new = np.full(3, rng.uniform(0.7, 1.6))
        new[rng.integers(3)] = rng.uniform(2.0, 5.0)
    new = np.maximum(new, min_mm)
    vox = np.prod(fov / new)
    if vox > max_voxels:
        new = new * (vox / max_voxels) ** (1 / 3)
    return new


def resample(image, mask, spacing, new_spacing):
    shape = np.asarray(image.shape)
    size = np.maximum(np.round(shape * np.asarray(spacing) / np.asarray(new_spacing)).astype(int), 2)
    if np.all(size == shape):
        return image, mask, np.asarray(spacing, float)
    real_sp = np.asarray(spacing) * shape / size
    img = _resize(image, size, "linear")
    m = _resize(mask.astype(np.float32), size, "linear") > 0.5
    return img.astype(np.float32), m, real_sp


def _intensity_aug(img01: np.ndarray, rng) -> np.ndarray:
    """Random intensity transforms on a [0, 1]-normalised region (MONAI transforms + a random transfer curve)."""
    from monai.transforms import (RandAdjustContrast, RandBiasField, RandGaussianNoise, RandGaussianSmooth,
                                  RandHistogramShift)

    seed = int(rng.integers(2 ** 31))
    t = torch.from_numpy(np.ascontiguousarray(img01))[None]
    if rng.random() < 0.15:  # non-monotonic random transfer curve (MR-like contrast changes, inversions)
        xs = np.linspace(0, 1, 6)
        ys = rng.random(6)
        t = torch.from_numpy(np.interp(t.numpy(), xs, ys).astype(np.float32))
    steps = [RandHistogramShift(num_control_points=(4, 8), prob=0.3),
             RandAdjustContrast(prob=0.3, gamma=(0.6, 1.7)),
             RandBiasField(degree=3, coeff_range=(0.05, 0.35), prob=0.3),
             RandGaussianSmooth(sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2), sigma_z=(0.3, 1.2), prob=0.2),
             RandGaussianNoise(prob=0.35, mean=0.0, std=float(rng.uniform(0.005, 0.06)))]
    for i, tr in enumerate(steps):
        tr.set_random_state(seed + i)
        t = tr(t)
    return np.asarray(t[0], dtype=np.float32)


def augment(sample: Sample, rng, spatial: bool = True, intensity: bool = True) -> Optional[Sample]:
    """Spacing change, flips, axis permutation, intensity transforms. Returns None if the object vanished."""
    img, m, sp = sample.image, sample.mask, np.asarray(sample.spacing, float)
    if spatial:
        img, m, sp = resample(img, m, sp, random_spacing(sp, img.shape, rng))
        if not m.any():
            return None
        perm = rng.permutation(3) if rng.random() < 0.5 else np.arange(3)
        img, m, sp = img.transpose(perm), m.transpose(perm), sp[perm]
        flips = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))
        if flips:
            img, m = np.flip(img, flips), np.flip(m, flips)
        img, m = np.ascontiguousarray(img), np.ascontiguousarray(m)
    if intensity:
        img = _intensity_aug(img, rng)
    return Sample(img.astype(np.float32), m, sp, sample.label_id, sample.kind, sample.name)


# ----------------------------------------------------------------------------------------------------------------
# synthetic shapes
# ----------------------------------------------------------------------------------------------------------------

def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _smooth_noise(shape, sigma, rng) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def _coords_mm(shape, spacing, centre):
    axes = [(np.arange(s) - c) * d for s, c, d in zip(shape, centre, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def shape_blob(shape, spacing, centre, radius_mm, rng, irregular: float = 0.35) -> np.ndarray:
    """Ellipsoid with random axes and orientation, its surface perturbed by smooth noise."""
    x = _coords_mm(shape, spacing, centre) @ _random_rotation(rng)
    axes = radius_mm * rng.uniform(0.5, 1.3, size=3)
    r = np.sqrt(((x / axes) ** 2).sum(-1))
    sigma = np.maximum(radius_mm * 0.4 / np.asarray(spacing), 1.0)
    return r + irregular * rng.uniform(0.2, 1.0) * _smooth_noise(shape, sigma, rng) < 1.0


def shape_tube(shape, spacing, centre, length_mm, rng) -> np.ndarray:
    """Tube of smoothly varying radius (1.5 .. 7 mm) along a random smooth curve through ``centre``."""
    n = max(8, int(length_mm / 1.0))
    d = rng.normal(size=3)
    d /= np.linalg.norm(d)
    turn = rng.uniform(0.02, 0.15)
    pts = [np.zeros(3)]
    for _ in range(n):
        d = d + rng.normal(size=3) * turn
        d /= np.linalg.norm(d)
        pts.append(pts[-1] + d * 1.0)
    pts = np.asarray(pts) - np.mean(pts, axis=0)
    r0 = rng.uniform(1.5, 6.0)
    radius = np.clip(r0 * np.exp(np.cumsum(rng.normal(0, 0.03, len(pts)))), 1.2, 7.0)
    vox = np.round(pts / np.asarray(spacing) + np.asarray(centre)).astype(int)
    inside = np.all((vox >= 0) & (vox < np.asarray(shape)), axis=1)
    grid = np.ones(shape, dtype=bool)
    rad_map = np.zeros(shape, dtype=np.float32)
    vox, radius = vox[inside], radius[inside]
    if len(vox) == 0:
        return np.zeros(shape, dtype=bool)
    grid[tuple(vox.T)] = False
    rad_map[tuple(vox.T)] = radius
    dist, idx = ndimage.distance_transform_edt(grid, sampling=spacing, return_indices=True)
    return dist <= rad_map[tuple(idx)]


def paste(image: np.ndarray, mask: np.ndarray, rng, paint: Optional[np.ndarray] = None) -> np.ndarray:
    """Blend an object with random contrast and texture into ``image`` (a region, modified copy returned).
    ``paint`` (default ``mask``) is where intensity changes; its edge is softened."""
    paint = mask if paint is None else paint
    lo, hi = np.percentile(image, [2, 98])
    scale = max(hi - lo, 1e-3)
    around = image[ndimage.binary_dilation(paint, iterations=2) & ~paint]
    base = float(np.median(around)) if around.size else float(np.median(image))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if base + 0.3 * scale > hi:
        sign = -1.0
    elif base - 0.3 * scale < lo:
        sign = 1.0
    target = base + sign * rng.uniform(0.12, 0.8) * scale
    tex = _smooth_noise(image.shape, rng.uniform(0.5, 2.5), rng) * rng.uniform(0.0, 0.12) * scale
    keep = rng.uniform(0.0, 0.5)
    alpha = ndimage.gaussian_filter(paint.astype(np.float32), rng.uniform(0.3, 1.0))
    alpha = np.maximum(alpha, paint * rng.uniform(0.85, 1.0))
    obj = target + tex + keep * (image - base)
    return (image * (1 - alpha) + obj * alpha).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------------------------

class ObjectSampler:
    """Draws :class:`Sample` objects from the training volumes (see the module docstring).

    Args:
        volumes: from :func:`load_volumes` (with :func:`precompute` run for the pseudo-label sources).
        holdout: structure names never drawn (the validation structures).
        weights: source -> probability (missing sources are skipped).
        volume_weights: volume name -> factor on that volume's share of the ``real`` source (default 1; 0 = never
            drawn as a real structure), e.g. to damp atlas parcellations whose borders are not image edges.
    """

    def __init__(self, volumes: Sequence[Volume], holdout: Sequence[str] = DEFAULT_HOLDOUT,
                 weights: Optional[Dict[str, float]] = None, only_holdout: bool = False,
                 volume_weights: Optional[Dict[str, float]] = None) -> None:
        self.volumes = list(volumes)
        self.holdout = set(holdout)
        self.max_region_voxels = 1.6e6
        w = dict(SOURCE_WEIGHTS if weights is None else weights)
        if not any(v.segmaps for v in self.volumes):
            w = {k: p for k, p in w.items() if k not in ("slic", "watershed")}
        self.sources = [k for k, p in w.items() if p > 0]
        p = np.asarray([w[k] for k in self.sources], float)
        self.p = p / p.sum()
        # real structures: (volume index, label value, name, vocabulary id)
        self.structures = []
        for vi, v in enumerate(self.volumes):
            for lab, sl in v.bboxes.items():
                name = v.names.get(lab, "")
                if not name or (name in self.holdout) != only_holdout:
                    continue
                vid = vocab_id(name)
                self.structures.append((vi, lab, name, -1 if vid is None else vid))
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
        if not self.structures:
            self.sources = [s for s in self.sources if s != "real"]
            self.p = np.asarray([w[k] for k in self.sources], float)
            self.p /= self.p.sum()

    # -- public ---------------------------------------------------------------------------------------------
    def sample(self, rng, source: Optional[str] = None, aug: bool = True, tries: int = 20) -> Sample:
        for _ in range(tries):
            src = source or self.sources[rng.choice(len(self.sources), p=self.p)]
            s = getattr(self, f"_{src}")(rng)
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
        m_full = (v.labels > 0) if lab == 1000 else (v.labels == lab)
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
        img = _resize(img, (window,) * 3, "linear")
        msk = _resize(msk.astype(np.float32), (window,) * 3, "linear") > 0.5
        img = _norm01(img, v.lo, v.hi)
        if aug:  # intensity only: flips would swap left/right names (the engine does not reorient either)
            img = _intensity_aug(img, rng)
        return Sample(img, msk, np.full(3, spacing_mm), vid, "concept", name), vid

    # -- helpers --------------------------------------------------------------------------------------------
    def _finish(self, v: Volume, region, mask, kind, name="", vid=-1, image=None) -> Sample:
        img = v.image[region] if image is None else image
        sp = v.spacing.copy()
        stride = int(np.floor((img.size / self.max_region_voxels) ** (1 / 3)))
        if stride > 1:  # a huge region (whole brain at 1 mm) would be resampled to coarser spacing anyway
            img, mask = img[::stride, ::stride, ::stride], mask[::stride, ::stride, ::stride]
            sp = sp * stride
        return Sample(_norm01(img, v.lo, v.hi), np.ascontiguousarray(mask), sp, vid, kind, name)

    def _pick_seed(self, v: Volume, rng) -> np.ndarray:
        return v.seeds[rng.integers(len(v.seeds))]

    # -- sources --------------------------------------------------------------------------------------------
    def _real(self, rng):
        members = self._by_volume[rng.choice(len(self._p_volume), p=self._p_volume)]
        vi, lab, name, vid = self.structures[members[rng.integers(len(members))]]
        v = self.volumes[vi]
        sl = v.bboxes[lab]
        lo = [s.start for s in sl]
        hi = [s.stop - 1 for s in sl]
        region = _region(v.image.shape, lo, hi, v.spacing, rng)
        lr = v.labels[region]
        m = (lr > 0) if lab == 1000 else (lr == lab)
        return self._finish(v, region, m, "real", name, vid)

    def _synth(self, rng):
        """Synthetic contrast (the SynthSeg idea): a labelled structure as in ``real``, but the image is rendered
        from the volume's label map in the region: every label value (and the unlabelled tissue) gets a random
        mean and texture, partial-volume blur, then (in :func:`augment`) random spacing / thick slices, bias field
        and noise, so shape and boundary, not one scanner's contrast, tell the structure. With probability 0.5 the
        unlabelled tissue keeps the real image through a random transfer curve."""
        if not self.structures:
            return None
        members = self._by_volume[rng.choice(len(self._p_volume), p=self._p_volume)]
        vi, lab, name, vid = self.structures[members[rng.integers(len(members))]]
        v = self.volumes[vi]
        sl = v.bboxes[lab]
        region = _region(v.image.shape, [s.start for s in sl], [s.stop - 1 for s in sl], v.spacing, rng)
        lr = np.asarray(v.labels[region])
        n = int(lr.max()) + 1  # look-up tables indexed by label value (label maps are small integers)
        mean = rng.uniform(0.0, 1.0, n).astype(np.float32)
        std = rng.uniform(0.0, 0.08, n).astype(np.float32)
        img = mean[lr] + std[lr] * rng.standard_normal(lr.shape, dtype=np.float32)
        if rng.random() < 0.5:  # unlabelled tissue: the real image through a random curve
            real = _norm01(np.asarray(v.image[region], np.float32), v.lo, v.hi)
            curve = (np.sort(rng.random(5)) if rng.random() < 0.5 else rng.random(5)).astype(np.float32)
            bg = lr == 0
            img[bg] = np.interp(real[bg], np.linspace(0, 1, 5, dtype=np.float32), curve)
        if rng.random() < 0.5:  # partial volume / texture scale
            img = ndimage.gaussian_filter(img, float(rng.uniform(0.4, 1.2)), truncate=2.0)
        m = (lr > 0) if lab == 1000 else (lr == lab)
        img = v.lo + np.clip(img, 0, 1) * (v.hi - v.lo)  # back to the volume's units (``_finish`` rescales)
        return self._finish(v, region, m, "synth", name, vid, image=img.astype(np.float32))

    def _segmap(self, rng, key):
        cands = [v for v in self.volumes if v.segmaps]
        v = cands[rng.integers(len(cands))]
        names = [k for k in v.segmaps if k.startswith(key)]
        seg, valid, slices = v.segmaps[names[rng.integers(len(names))]]
        if len(valid) == 0:
            return None
        s = int(valid[rng.integers(len(valid))])
        sl = slices[s - 1]
        region = _region(v.image.shape, [x.start for x in sl], [x.stop - 1 for x in sl], v.spacing, rng)
        m = seg[region] == s
        if cc3d is not None:
            m = cc3d.largest_k(m.astype(np.uint8), k=1) > 0
        return self._finish(v, region, m, key)

    def _slic(self, rng):
        return self._segmap(rng, "slic")

    def _watershed(self, rng):
        return self._segmap(rng, "watershed")

    def _window(self, rng):
        """Connected component (6-connectivity) of an intensity window around a random seed's value."""
        v = self.volumes[rng.integers(len(self.volumes))]
        for _ in range(12):
            c = self._pick_seed(v, rng)
            half = np.ceil(rng.uniform(20, 60) / v.spacing).astype(int)
            region = tuple(slice(int(max(0, x - h)), int(min(n, x + h + 1)))
                           for x, h, n in zip(c, half, v.image.shape))
            sub = _norm01(v.image[region], v.lo, v.hi)
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
            # the component must not be cut by the window (except at the image border)
            touches = False
            for ax in range(3):
                first = np.take(m, 0, axis=ax).any() and region[ax].start > 0
                last = np.take(m, -1, axis=ax).any() and region[ax].stop < v.image.shape[ax]
                touches |= first or last
            if touches:
                continue
            nz = np.nonzero(m)
            lo = [int(x.min()) + r.start for x, r in zip(nz, region)]
            hi = [int(x.max()) + r.start for x, r in zip(nz, region)]
            big = _region(v.image.shape, lo, hi, v.spacing, rng)
            full = np.zeros(tuple(s.stop - s.start for s in big), bool)
            off = [r.start - b.start for r, b in zip(region, big)]
            # the window is inside the big region unless clipped; paste the mask where they overlap
            src = tuple(slice(max(0, -o), min(mm, bb.stop - bb.start - o)) for o, mm, bb in zip(off, m.shape, big))
            dst = tuple(slice(o + s.start, o + s.stop) for o, s in zip(off, src))
            full[dst] = m[src]
            if full.any():
                return self._finish(v, big, full, "window")
        return None

    def _synthetic(self, rng, kind):
        v = self.volumes[rng.integers(len(self.volumes))]
        c = self._pick_seed(v, rng)
        sp = v.spacing
        if kind == "lesion":
            size_mm = rng.uniform(3.0, 10.0)
        elif kind == "tube":
            size_mm = rng.uniform(15.0, 50.0)
        else:
            size_mm = rng.uniform(6.0, 35.0)
        lo = c - np.ceil(size_mm * 1.6 / sp).astype(int)
        hi = c + np.ceil(size_mm * 1.6 / sp).astype(int)
        region = _region(v.image.shape, np.maximum(lo, 0), np.minimum(hi, np.asarray(v.image.shape) - 1), sp, rng)
        img = v.image[region].astype(np.float32)
        # the object is drawn and pasted in a local box around its centre (cheap), inside the region
        cr = np.asarray([x - r.start for x, r in zip(c, region)])
        half = np.ceil(size_mm * 1.7 / sp).astype(int) + 2
        a = np.maximum(cr - half, 0)
        b = np.minimum(cr + half + 1, np.asarray(img.shape))
        loc = tuple(slice(int(x), int(y)) for x, y in zip(a, b))
        shape = tuple(int(y - x) for x, y in zip(a, b))
        centre = (cr - a).astype(float)
        sub = img[loc]
        if kind == "tube":
            m = shape_tube(shape, sp, centre, 2 * size_mm, rng)
            paint = m
        elif kind == "shell":
            blob = shape_blob(shape, sp, centre, size_mm, rng, irregular=0.2)
            t = max(1, int(round(rng.uniform(1.0, 4.0) / sp.min())))
            inner = ndimage.binary_erosion(blob, iterations=t)
            m = blob & ~inner
            paint = m
            if rng.random() < 0.5 and inner.any():  # the inside gets its own contrast (a cyst with a wall)
                sub = paste(sub, inner, rng)
        elif kind == "lesion":
            m = shape_blob(shape, sp, centre, size_mm, rng, irregular=0.25)
            paint = m
        else:
            m = shape_blob(shape, sp, centre, size_mm, rng)
            paint = m
        if cc3d is not None and m.any():
            m = cc3d.largest_k(m.astype(np.uint8), k=1, connectivity=26) > 0
        if m.sum() < 8:
            return None
        img[loc] = paste(sub, paint, rng)
        full = np.zeros(img.shape, bool)
        full[loc] = m
        m = full
        return self._finish(v, region, m, kind, image=img)

    def _blob(self, rng):
        return self._synthetic(rng, "blob")

    def _tube(self, rng):
        return self._synthetic(rng, "tube")

    def _shell(self, rng):
        return self._synthetic(rng, "shell")

    def _lesion(self, rng):
        return self._synthetic(rng, "lesion")
