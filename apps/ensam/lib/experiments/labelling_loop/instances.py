"""Instances of a structure family: found in a dataset, drawn, cropped into their own datastore images."""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np


@dataclass
class Instance:
    """One structure instance: ``value`` of ``scan``'s label, cropped into its own datastore image ``image_id``."""

    image_id: str
    scan: str
    value: int
    name: str
    voxels: int = 0
    crop: List[int] = field(default_factory=list)  # [i0, i1, j0, j1, k0, k1] in the scan, half-open
    gt_path: str = ""


def find_instances(data_dir: str, pattern: str, modality: str = "", min_voxels: int = 200,
                   cases: Sequence[str] = ()) -> List[dict]:
    """Every (scan, label value) of ``data_dir``'s dataset.json whose label name matches ``pattern`` (and whose scan
    has ``modality`` when given; only the scans named in ``cases`` when given), sorted by scan and value:
    ``{"case", "value", "name"}`` (voxels checked later). A value that the entry's ``unions`` defines (lib.cohorts)
    is the union of its members."""
    from lib.evaluation.evaluator import load_dataset

    rx = re.compile(pattern)
    out = []
    keep = set(cases)
    for case in load_dataset(data_dir):
        if keep and case.name not in keep:
            continue
        if modality and case.modality.upper() != modality.upper():
            continue
        for value, name in sorted(case.labels.items()):
            if rx.search(name):
                out.append({"case": case, "value": int(value), "name": name})
    return [dict(d, min_voxels=min_voxels) for d in out]


def select(candidates: List[dict], n: int, seed: int) -> List[dict]:
    """``n`` of the candidates, drawn without replacement with ``seed`` (all when ``n`` <= 0 or more than there
    are), kept in their sorted order."""
    if n <= 0 or n >= len(candidates):
        return list(candidates)
    idx = np.sort(np.random.default_rng(seed).choice(len(candidates), size=n, replace=False))
    return [candidates[i] for i in idx]


def crop_bounds(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> List[int]:
    """The mask's bounding box grown by ``margin_mm`` per side (at least 2 voxels), clipped to the volume; half-open
    ``[i0, i1, j0, j1, k0, k1]``."""
    from lib.geometry import mask_bbox

    box = mask_bbox(mask)
    out = []
    for a in range(3):
        pad = max(2, int(np.ceil(margin_mm / float(spacing[a]))))
        out += [max(0, int(box[2 * a]) - pad), min(mask.shape[a], int(box[2 * a + 1]) + 1 + pad)]
    return out


def crop_instance(image: np.ndarray, affine: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
                  margin_mm: float):
    """One instance cut out of its scan: ``(image crop, mask crop as uint8, the crop's affine, crop_bounds)``."""
    c = crop_bounds(mask, spacing, margin_mm)
    sl = tuple(slice(c[2 * a], c[2 * a + 1]) for a in range(3))
    aff = np.array(affine, dtype=np.float64)
    aff[:3, 3] = aff[:3, :3] @ np.array([c[0], c[2], c[4]], dtype=np.float64) + aff[:3, 3]
    return np.ascontiguousarray(image[sl]), mask[sl].astype(np.uint8), aff, c


def build_instances(chosen: List[dict], studies: str, gt_dir: str, margin_mm: float) -> List[Instance]:
    """Write each chosen instance's crop into ``studies`` (the datastore's image) and its reference mask into
    ``gt_dir``; instances smaller than their ``min_voxels`` are left out."""
    import nibabel as nib

    from lib.cohorts import structure_mask
    from lib.geometry import spacing_from_affine
    from lib.io.volumes import load_volume

    os.makedirs(studies, exist_ok=True)
    os.makedirs(gt_dir, exist_ok=True)
    out: List[Instance] = []
    by_case: Dict[str, List[dict]] = {}
    for d in chosen:
        by_case.setdefault(str(d["case"].image), []).append(d)
    n = 0
    for items in by_case.values():
        case = items[0]["case"]
        img = load_volume(str(case.image))
        lab = np.asarray(load_volume(str(case.label)).array)
        arr = np.asarray(img.array)
        spacing = spacing_from_affine(img.affine)
        for d in items:
            mask = structure_mask(lab, d["value"], case.unions)
            if int(mask.sum()) < d["min_voxels"]:
                continue
            image, gt, affine, c = crop_instance(arr, img.affine, mask, spacing, margin_mm)
            image_id = f"inst{n:02d}_{case.name}_{d['value']}"
            n += 1
            nib.save(nib.Nifti1Image(image, affine), os.path.join(studies, image_id + ".nii.gz"))
            gt_path = os.path.join(gt_dir, image_id + ".nii.gz")
            nib.save(nib.Nifti1Image(gt, affine), gt_path)
            out.append(Instance(image_id, case.name, int(d["value"]), d["name"], int(mask.sum()), c, gt_path))
    return sorted(out, key=lambda i: i.image_id)


def instance_rng(seed: int, image_id: str) -> np.random.Generator:
    """The annotator's generator for one instance (box jitter, then click ties), seeded as the evaluator seeds a
    structure: from (seed, image name, label value 1)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(image_id.encode()), 1]))
