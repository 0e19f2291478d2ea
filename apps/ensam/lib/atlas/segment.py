"""Segmentation by example: atlases registered onto a new image, fused, turned into prompts for ensam.

    lib = AtlasLibrary.from_dataset("sample-datasets/train")            # the reference atlases of the app
    seg = SegmentByExample(lib, engine)                                  # engine: lib.engine.EnsamEngine or None
    res = seg.segment(image, affine, ["liver", "spleen"], image_key=vol.key, log=print)
    res.structures["liver"].mask          # ensam's mask (the atlas-fused mask when there is no engine)
    res.structures["liver"].uncertainty   # 1 - mean pairwise Dice of the atlases' masks and ensam's mask

For each name, the atlases that carry it (pre-selected: same modality first, then the ones carrying most of the
requested names; at most ``max_atlases``) are registered onto the image ONCE for all names (transforms cached
per image), their label maps are pulled onto the image's grid, the masks of each name are fused by vote, and the
fused mask becomes a box, foreground clicks where the atlases agree and background clicks inside the box where
none of them sees the structure. ensam then segments the structure from these prompts on the new image, so the
boundary is the image's own, not the warped atlas's; the atlases then act as the user for ``corrections``
corrective clicks where ensam's answer and theirs disagree most.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from lib.cache import ByteLRU
from lib.geometry import mask_bbox, spacing_from_affine
from lib.io.volumes import load_volume
from lib.labels import label_id, label_name

from .fusion import fuse, fuse_local, local_weights, pairwise_agreement
from .prompting import Prompts, deepest_points, prompts_from_fused
from .registration import (RegistrationConfig, from_sitk, guess_modality, prepare, propagate, register,
                           robust_bounds, robust_intensities, to_sitk)

logger = logging.getLogger(__name__)


def canonical_name(name: str) -> str:
    """The vocabulary's spelling of a structure name (aliases, case tolerated); the stripped name otherwise."""
    idx = label_id(str(name))
    return label_name(idx) if idx is not None else str(name).strip()


def best_route(scores: Dict[str, float], floor: float) -> Optional[str]:
    """The route (``"atlas+ensam"``, ``"atlas"``, ``"token"``...) with the best validation score, or None when
    there is none or the best is below ``floor``: the one rule by which ``ensam_seg`` offers a name."""
    if not scores:
        return None
    best = max(scores, key=lambda r: scores[r])
    return best if scores[best] >= floor else None


@dataclass
class Atlas:
    """A labelled image usable as an example: ``names`` maps structure names to voxel values of its label."""

    key: str
    image_path: str
    label_path: str
    names: Dict[str, int]
    modality: str = ""
    source: str = "reference"  # "reference" (shipped with the app) or "datastore" (a hospital's final label)


class AtlasLibrary:
    """The atlases available, with their prepared (coarse) images cached once loaded."""

    def __init__(self, atlases: Sequence[Atlas] = (), reg_cfg: Optional[RegistrationConfig] = None):
        self.atlases: List[Atlas] = list(atlases)
        self.reg_cfg = reg_cfg or RegistrationConfig()
        self._prepared: Dict[str, tuple] = {}
        self._lock = threading.Lock()
        self._intensity = ByteLRU(max_bytes=512 * 2**20, sizeof=lambda v: v[1].GetNumberOfPixels() * 4)

    @classmethod
    def from_dataset(cls, folder: str, reg_cfg: Optional[RegistrationConfig] = None,
                     exclude: Sequence[str] = ()) -> "AtlasLibrary":
        """Atlases from a ``dataset.json`` folder (its ``training`` entries with a ``label`` and ``labels``
        {value: name}); a missing folder gives an empty library."""
        path = os.path.join(folder, "dataset.json")
        if not os.path.exists(path):
            logger.warning(f"atlas library: no {path}; no reference atlases")
            return cls([], reg_cfg)
        with open(path) as f:
            ds = json.load(f)
        out = []
        for e in ds.get("training") or []:
            if not e.get("label") or not e.get("labels"):
                continue
            key = os.path.basename(e["image"]).split(".")[0]
            if key in exclude:
                continue
            names = {canonical_name(n): int(v) for v, n in e["labels"].items()}
            out.append(Atlas(key, os.path.join(folder, e["image"]), os.path.join(folder, e["label"]), names,
                             str(e.get("modality", "")).upper(), "reference"))
        return cls(out, reg_cfg)

    def add(self, atlas: Atlas) -> None:
        with self._lock:
            self.atlases = [a for a in self.atlases if a.key != atlas.key] + [atlas]
            self._prepared.pop(atlas.key, None)

    def subset(self, atlases: Sequence[Atlas]) -> "AtlasLibrary":
        """A library of some of these atlases that shares this one's prepared images (loaded once for both)."""
        out = AtlasLibrary(atlases, self.reg_cfg)
        out._prepared, out._lock, out._intensity = self._prepared, self._lock, self._intensity
        return out

    def names(self) -> Dict[str, List[str]]:
        """name -> keys of the atlases that carry it."""
        out: Dict[str, List[str]] = {}
        for a in self.atlases:
            for n in a.names:
                out.setdefault(n, []).append(a.key)
        return out

    def carrying(self, name: str) -> List[Atlas]:
        return [a for a in self.atlases if name in a.names]

    def prepared(self, atlas: Atlas):
        """(coarse registration image, label map as a SimpleITK image, modality), loaded once per atlas file."""
        stamp = (os.path.getmtime(atlas.image_path), os.path.getmtime(atlas.label_path))
        with self._lock:
            hit = self._prepared.get(atlas.key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        img = load_volume(atlas.image_path)
        lab = load_volume(atlas.label_path)
        if lab.shape != img.shape:
            raise ValueError(f"atlas {atlas.key}: label shape {lab.shape} differs from image {img.shape}")
        modality = atlas.modality or guess_modality(img.array)
        coarse_img = prepare(to_sitk(img.array, img.affine), modality, self.reg_cfg)
        lab_img = to_sitk(np.asarray(lab.array).astype(np.int32), img.affine, np.int32)
        value = (coarse_img, lab_img, modality)
        with self._lock:
            self._prepared[atlas.key] = (stamp, value)
        return value


    def intensity(self, atlas: Atlas) -> sitk.Image:
        """The atlas image at full resolution on registration's intensity scale (0..1), for local fusion weights."""
        stamp = os.path.getmtime(atlas.image_path)
        hit = self._intensity.get(atlas.key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        img = load_volume(atlas.image_path)
        modality = atlas.modality or guess_modality(img.array)
        value = robust_intensities(to_sitk(img.array, img.affine), modality)
        self._intensity.put(atlas.key, (stamp, value))
        return value


@dataclass
class Structure:
    """One structure's answer, kept as crops of the region around it (``region``: slices of the image)."""

    name: str
    shape: tuple
    region: tuple  # slices of the image holding every mask below
    mask_crop: np.ndarray  # the answer: ensam's mask from the atlas prompts (or the fused mask without an engine)
    atlas_crop: np.ndarray  # the fused atlas mask
    atlases: List[str]
    agreement: Optional[float]  # mean pairwise Dice between the atlases (None with one atlas)
    uncertainty: float  # 1 - mean pairwise Dice over the atlases' masks and ensam's mask
    prompts: dict = field(default_factory=dict)
    source: str = "atlas+ensam"

    def _full(self, crop: np.ndarray) -> np.ndarray:
        out = np.zeros(self.shape, dtype=bool)
        out[self.region] = crop
        return out

    @property
    def mask(self) -> np.ndarray:
        return self._full(self.mask_crop)

    @property
    def atlas_mask(self) -> np.ndarray:
        return self._full(self.atlas_crop)

    def paste(self, out: np.ndarray, value: int) -> None:
        """Write ``value`` into ``out`` (the image's label map) where the answer is."""
        out[self.region][self.mask_crop] = value

    def summary(self) -> dict:
        return {"atlases": self.atlases, "agreement": None if self.agreement is None else round(self.agreement, 4),
                "uncertainty": round(self.uncertainty, 4), "voxels": int(np.count_nonzero(self.mask_crop)),
                "atlas_voxels": int(np.count_nonzero(self.atlas_crop)), "prompts": self.prompts,
                "source": self.source}


def _union(boxes: Sequence[tuple], shape, margin: int) -> tuple:
    """Slices covering every box (slices tuples), grown by ``margin`` voxels, within the image."""
    lo = np.min([[b.start for b in box] for box in boxes], axis=0) - margin
    hi = np.max([[b.stop for b in box] for box in boxes], axis=0) + margin
    return tuple(slice(int(max(a, 0)), int(min(b, n))) for a, b, n in zip(lo, hi, shape))


@dataclass
class Result:
    structures: Dict[str, Structure]
    missing: Dict[str, str]  # name -> why nothing was produced
    registrations: Dict[str, dict]
    seconds: Dict[str, float]


class SegmentByExample:
    """Registration cache + fusion + prompting + ensam. Thread-safe; one image is registered at a time.

    Args:
        library: the atlases. engine: an object with ``segment_step(image, affine, points=, point_labels=, boxes=,
            prev_mask=, image_key=, prev_info=)`` -> (mask, info) (``lib.engine.EnsamEngine``); None gives the
            atlas-only answer.
        max_atlases: atlases registered per image (pre-selection). n_fg / n_bg: clicks from the fused mask.
        use_prev_mask: also give ensam the fused mask as its previous mask.
        corrections: corrective clicks the atlases give after ensam's first answer (default 2, chosen by
            leave-one-out on the training CTs; 0: none). Each is at the deepest voxel of the larger error against
            them: a foreground click where every atlas sees the structure and ensam does not, or a background click
            where ensam answers farther than ``leak_mm`` from every atlas.
        cache_images: images whose transforms are kept.
    """

    MARGIN = 8  # voxels around the atlases' union in which a structure is fused and prompted

    def __init__(self, library: AtlasLibrary, engine=None, max_atlases: int = 4, n_fg: int = 2, n_bg: int = 2,
                 use_prev_mask: bool = False, cache_images: int = 4, corrections: int = 2, leak_mm: float = 10.0,
                 fusion: str = "majority", fusion_sigma: float = 2.0, fusion_power: float = 1.0):
        if fusion not in ("majority", "local"):
            raise ValueError(f"fusion must be 'majority' or 'local', not {fusion!r}")
        self.fusion, self.fusion_sigma, self.fusion_power = fusion, float(fusion_sigma), float(fusion_power)
        self.library = library
        self.engine = engine
        self.max_atlases = int(max_atlases)
        self.n_fg, self.n_bg = int(n_fg), int(n_bg)
        self.use_prev_mask = bool(use_prev_mask)
        self.corrections, self.leak_mm = int(corrections), float(leak_mm)
        # image key -> {atlas key: registration}; entries bounded, the newest image's kept (0: none kept)
        self._cache = ByteLRU(max_items=int(cache_images))
        self._lock = threading.RLock()

    def select(self, names: Sequence[str], modality: str) -> List[Atlas]:
        """Atlases carrying at least one of ``names``: same modality first, then most names carried, then
        reference before datastore order; at most ``max_atlases``."""
        wanted = set(names)
        cands = [a for a in self.library.atlases if wanted & set(a.names)]
        cands.sort(key=lambda a: (a.modality != modality, -len(wanted & set(a.names)), a.source != "datastore",
                                  a.key))
        return cands[: self.max_atlases]

    def registrations(self, image: np.ndarray, affine: np.ndarray, atlases: Sequence[Atlas], image_key: str,
                      log: Callable[[str], None] = logger.info) -> Dict[str, tuple]:
        """{atlas key: (Registration, propagated label map, {value: slices})} for this image, each atlas registered
        once."""
        with self._lock:
            entry = self._cache.get(image_key)
            if entry is None:
                entry = {}
                if self._cache.max_items:
                    self._cache.put(image_key, entry)
            todo = [a for a in atlases if a.key not in entry]
            if todo:
                fixed = to_sitk(image, affine)
                modality = guess_modality(image)
                f = prepare(fixed, modality, self.library.reg_cfg)
                for n, a in enumerate(todo):
                    t = time.perf_counter()
                    try:
                        coarse_img, lab_img, _ = self.library.prepared(a)
                        reg = register(f, coarse_img, self.library.reg_cfg)
                        labels = propagate(lab_img, fixed, reg.transform)
                    except (OSError, ValueError, RuntimeError) as e:  # an unreadable atlas is skipped, not fatal
                        log(f"atlas {n + 1}/{len(todo)} {a.key}: skipped ({type(e).__name__}: {e})")
                        continue
                    # where each label value lies (one pass): every structure then works on its own region
                    objects = ndimage.find_objects(np.clip(labels, 0, None))
                    boxes = {v + 1: sl for v, sl in enumerate(objects) if sl is not None}
                    entry[a.key] = (reg, labels, boxes)
                    log(f"atlas {n + 1}/{len(todo)} {a.key}: registered in {time.perf_counter() - t:.1f}s "
                        f"(metric {reg.metric:.3f})")
            return {a.key: entry[a.key] for a in atlases if a.key in entry}

    def segment(self, image: np.ndarray, affine: np.ndarray, names: Sequence[str], image_key: Optional[str] = None,
                log: Callable[[str], None] = logger.info, use_engine: bool = True,
                atlas_only: Sequence[str] = ()) -> Result:
        """Segment ``names``; ensam refines every one of them (``use_engine``) except those in ``atlas_only``,
        which keep the fused atlas mask."""
        t0 = time.perf_counter()
        image = np.asarray(image)
        names = list(dict.fromkeys(canonical_name(n) for n in names))
        modality = guess_modality(image)
        atlases = self.select(names, modality)
        key = image_key or f"{id(image)}:{image.shape}"
        regs = self.registrations(image, affine, atlases, key, log)
        t_reg = time.perf_counter()
        spacing = spacing_from_affine(affine)
        structures: Dict[str, Structure] = {}
        missing: Dict[str, str] = {}
        plain = {canonical_name(n) for n in atlas_only}
        for n, name in enumerate(names):
            engine = self.engine if use_engine and name not in plain else None
            carriers = [a for a in atlases if name in a.names and a.key in regs]
            if not carriers:
                skipped = any(name in a.names for a in atlases)
                missing[name] = ("the atlases that carry this structure could not be registered" if skipped
                                 else "no atlas carries this structure")
                continue
            found = [(a, regs[a.key][2][a.names[name]]) for a in carriers if a.names[name] in regs[a.key][2]]
            if not found:
                missing[name] = "the registered atlases put this structure outside the image"
                continue
            s = self._one(image, affine, spacing, name, carriers, [regs[a.key][1] for a in carriers],
                          _union([b for _, b in found], image.shape, self.MARGIN), key, engine,
                          [regs[a.key][0].transform for a in carriers])
            structures[name] = s
            log(f"structure {n + 1}/{len(names)} {name}: {int(np.count_nonzero(s.mask))} voxels, "
                f"uncertainty {s.uncertainty:.3f} ({len(carriers)} atlases)")
        t_end = time.perf_counter()
        reg_info = {k: {"metric": round(r.metric, 4), "affine_metric": round(r.affine_metric, 4),
                        "seconds": round(r.seconds, 2)} for k, (r, _, _) in regs.items()}
        return Result(structures, missing, reg_info,
                      {"registration": round(t_reg - t0, 2), "segmentation": round(t_end - t_reg, 2),
                       "total": round(t_end - t0, 2)})

    def _one(self, image, affine, spacing, name: str, carriers: Sequence[Atlas], label_maps, region: tuple,
             image_key, engine, transforms: Sequence = ()) -> Structure:
        """Fuse, prompt and segment one structure; every array operation is on ``region`` (the atlases' union grown
        by ``MARGIN``, then grown to ensam's answer), never on the whole image."""
        def crops(sl):
            return [lm[sl] == a.names[name] for a, lm in zip(carriers, label_maps)]

        def fusing(sl, masks):
            if self.fusion != "local" or len(masks) < 2 or len(transforms) != len(masks):
                return fuse(masks)
            return fuse_local(masks, self._local_weights(image, affine, sl, carriers, transforms))

        masks = crops(region)
        fused = fusing(region, masks)
        prompts: Prompts = prompts_from_fused(fused, spacing, self.n_fg, self.n_bg)
        start = np.array([sl.start for sl in region])
        if not prompts.empty:
            prompts.points = prompts.points + start
            prompts.box = [int(v + start[a // 2]) for a, v in enumerate(prompts.box)]
        mask, source = fused.mask, "atlas"
        if engine is not None and not prompts.empty:
            prev = None
            if self.use_prev_mask:
                prev = np.zeros(image.shape, dtype=bool)
                prev[region] = fused.mask
            out, info = engine.segment_step(image, affine, points=prompts.points if len(prompts.points) else None,
                                            point_labels=prompts.point_labels if len(prompts.points) else None,
                                            boxes=[prompts.box], prev_mask=prev, image_key=image_key)
            out = np.asarray(out) > 0
            for _ in range(self.corrections):
                click = self._correction(out[region], fused, spacing)
                if click is None:
                    break
                point, label = click
                prompts.points = np.concatenate([prompts.points, [point + start]]).astype(int)
                prompts.point_labels = np.concatenate([prompts.point_labels, [label]]).astype(int)
                out, info = engine.segment_step(image, affine, points=prompts.points,
                                                point_labels=prompts.point_labels, boxes=[prompts.box], prev_mask=out,
                                                image_key=image_key, prev_info=info)  # this answer's own ROI
                out = np.asarray(out) > 0
            box = mask_bbox(out)
            if box is not None:
                grown = _union([region, tuple(slice(int(box[2 * a]), int(box[2 * a + 1]) + 1) for a in range(3))],
                               image.shape, 0)
                if grown != region:  # ensam's answer reaches past the atlases' region: compare on the union
                    region, masks = grown, crops(grown)
                    fused = fusing(region, masks)
                mask, source = out[region], "atlas+ensam"
        raters = list(masks) + ([mask] if source != "atlas" else [])
        agreement = pairwise_agreement(raters)
        uncertainty = 1.0 - agreement if agreement is not None else 1.0
        return Structure(name, image.shape, region, mask, fused.mask, [a.key for a in carriers], fused.agreement,
                         uncertainty, prompts.summary(), source)


    def _local_weights(self, image, affine, region, carriers, transforms) -> List[np.ndarray]:
        """Per-voxel weights of the atlases on ``region``: their intensities pulled onto it vs the image's."""
        start = np.array([sl.start for sl in region], dtype=np.float64)
        aff = np.asarray(affine, dtype=np.float64).copy()
        aff[:3, 3] = aff[:3, :3] @ start + aff[:3, 3]
        crop = np.asarray(image)[region]
        bounds = robust_bounds(image, guess_modality(image))  # the whole image's scale, as its atlases'
        target = from_sitk(robust_intensities(to_sitk(crop, aff), "", bounds))
        ref = to_sitk(np.zeros(crop.shape, np.float32), aff)
        warped = [from_sitk(sitk.Resample(self.library.intensity(a), ref, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
                  for a, t in zip(carriers, transforms)]
        return local_weights(target, warped, self.fusion_sigma, self.fusion_power)

    def _correction(self, answer, fused, spacing):
        """(voxel in the region, 1 or 0) of the next corrective click the atlases give, or None."""
        miss = fused.consensus & ~answer
        far = ndimage.distance_transform_edt(~fused.mask, sampling=spacing) > self.leak_mm
        leak = answer & far
        region, label = (miss, 1) if np.count_nonzero(miss) >= np.count_nonzero(leak) else (leak, 0)
        pts = deepest_points(region, spacing, 1, min_depth_mm=2.0 * float(np.max(spacing)))
        return (pts[0], label) if len(pts) else None


def default_atlas_folder(app_dir: str) -> str:
    """Where the reference atlases live: ``<repo>/sample-datasets/train`` (fetched by ``make data``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(app_dir))), "sample-datasets", "train")


def sitk_threads(n: int) -> None:
    """Threads SimpleITK may use (registration, resampling)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(n)))
