"""Fine-tuning that does not forget (issue 29, item 2): the anchor toward the SHIPPED weights across rounds, and
rehearsal on the labelled reference atlases, through ``finetune`` and through the train task's job (tiny networks
and toy volumes)."""

import json
import os

import numpy as np
import pytest
import torch

from lib.network import NetworkConfig, build_network
from lib.training import data as D
from lib.training.finetune import ATLAS_RECIPE, atlas_volume_weights, atlas_volumes, finetune
from lib.training.loop import LoopConfig

torch.set_num_threads(1)
TINY = dict(filters=8, blocks=(1, 1, 1), depth=1, heads=2, num_labels=128, roi_size=(16, 16, 16))
LOOP = LoopConfig.on_grid((16, 16, 16), max_clicks=1)


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return build_network(NetworkConfig(**TINY))


def toy(seed=0, shift=0):
    """A CT-like toy volume (a body, two bright/dark structures): (image, label, affine)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 20, (40, 36, 32)).astype(np.float32) - 1000
    img[4:36, 4:32, 3:29] += 1040
    lab = np.zeros(img.shape, np.int16)
    lab[10 + shift:20 + shift, 10:19, 8:17] = 1
    img[lab == 1] += 90
    lab[24:32, 18:27, 14:24] = 5
    img[lab == 5] -= 70
    return img, lab, np.diag([1.5, 1.5, 2.0, 1.0])


def distance(net, target) -> float:
    return sum(float((p.detach() - target[n]).norm()) for n, p in net.named_parameters())


def test_the_anchor_pulls_toward_the_given_weights_not_the_start():
    """With ``anchor_weights`` the pull goes to them (the shipped weights), not to where the run started; a
    network the target does not fit is refused."""
    img, lab, aff = toy()
    cases = [{"image": img, "label": lab, "affine": aff}]
    shipped = {n: p.detach().clone() for n, p in tiny_net(1).named_parameters()}
    start = tiny_net(0)  # "the previous round's weights": elsewhere than the shipped ones
    d = {}
    for target in ("start", "shipped"):
        net = tiny_net(0)
        finetune(net, cases, max_seconds=60, max_steps=4, anchor=0.3, optimizer="adamw", lr=1e-3, keep_best=False,
                 loop=LOOP, anchor_weights=shipped if target == "shipped" else None)
        d[target] = distance(net, shipped)
    d0 = sum(float((p.detach() - shipped[n]).norm()) for n, p in start.named_parameters())
    assert d["shipped"] < 0.5 * d0 and d["start"] > 0.8 * d0, (d, d0)
    bad = dict(shipped)
    name = next(iter(bad))
    bad[name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        finetune(tiny_net(0), cases, max_seconds=60, max_steps=1, anchor=0.1, anchor_weights=bad, loop=LOOP)
    with pytest.raises(ValueError, match="no parameter"):
        finetune(tiny_net(0), cases, max_seconds=60, max_steps=1, anchor=0.1, anchor_weights={"x": torch.zeros(1)},
                 loop=LOOP)


def test_rehearsal_atlases_draw_the_reference_volumes_and_bad_fractions_are_refused():
    img, lab, aff = toy()
    cases = [{"image": img, "label": lab, "affine": aff}]
    a_img, a_lab, a_aff = toy(seed=3, shift=2)
    atlas = D.make_volume("atlas", a_img, a_aff, a_lab, {1: "spleen", 5: "liver"}, "CT")
    stats = finetune(tiny_net(), cases, max_seconds=60, max_steps=12, keep_best=False, loop=LOOP,
                     rehearsal_atlases=0.5, rehearsal_volumes=[atlas], seed=0)
    assert 2 <= stats["atlas_steps"] <= 10, stats
    assert finetune(tiny_net(), cases, max_seconds=60, max_steps=3, keep_best=False, loop=LOOP)["atlas_steps"] == 0
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="rehearsal_atlases"):
            finetune(tiny_net(), cases, max_seconds=60, max_steps=1, loop=LOOP, rehearsal_atlases=bad,
                     rehearsal_volumes=[atlas])
    with pytest.raises(ValueError, match="rehearsal_volumes"):
        finetune(tiny_net(), cases, max_seconds=60, max_steps=1, loop=LOOP, rehearsal_atlases=0.3)


def _nifti(path, array, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)


def _atlas_folder(root, n=3):
    """A ``dataset.json`` folder of ``n`` labelled toy atlases (and one without labels, never read)."""
    os.makedirs(os.path.join(root, "imagesTr"))
    os.makedirs(os.path.join(root, "labelsTr"))
    entries = []
    for i in range(n):
        img, lab, aff = toy(seed=10 + i, shift=i)
        _nifti(os.path.join(root, "imagesTr", f"a{i}.nii.gz"), img.astype(np.int16), aff)
        _nifti(os.path.join(root, "labelsTr", f"a{i}.nii.gz"), lab, aff)
        entries.append({"image": f"imagesTr/a{i}.nii.gz", "label": f"labelsTr/a{i}.nii.gz", "modality": "CT",
                        "labels": {"1": "spleen", "5": "liver"}})
    entries.append({"image": "imagesTr/missing.nii.gz"})
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"training": entries}, f)
    return root


def test_atlas_draws_are_weighted_by_the_shipped_recipe_file(tmp_path):
    """The rehearsal's volume weights are read from the recipe file (one place for the numbers), not a copy."""
    import yaml

    shipped = yaml.safe_load(ATLAS_RECIPE.read_text())["volume_weights"]
    assert atlas_volume_weights() == {k: float(v) for k, v in shipped.items()}
    assert atlas_volume_weights()["antspy_mni_aal"] < 1.0  # recipe v12 damps the brain parcellations
    other = tmp_path / "recipe.yaml"
    other.write_text("volume_weights: {ct_small: 0.25}\n")
    assert atlas_volume_weights(other) == {"ct_small": 0.25}
    other.write_text("lr: 0.001\n")
    assert atlas_volume_weights(other) == {}


def test_atlas_volumes_are_bounded_in_memory_and_never_the_evaluation_set(tmp_path):
    folder = _atlas_folder(str(tmp_path / "atlases"))
    vols = atlas_volumes(folder)
    assert sorted(v.name for v in vols) == ["a0", "a1", "a2"]
    assert all(v.names == {1: "spleen", 5: "liver"} and v.modality == "CT" for v in vols)
    n = 40 * 36 * 32
    small = atlas_volumes(folder, volume_voxels=n / 8)  # stride 2: half the voxels per axis, spacing doubled
    assert all(v.image.shape == (20, 18, 16) for v in small)
    assert np.allclose(small[0].spacing, [3.0, 3.0, 4.0]) and small[0].labels.shape == small[0].image.shape
    assert len(atlas_volumes(folder, max_voxels=2.5 * n)) == 2  # the budget: two of the three
    assert atlas_volumes(str(tmp_path / "none")) == []
    with pytest.raises(ValueError, match="evaluation"):
        atlas_volumes(str(tmp_path / "eval"))


# ---- the train task's job: two rounds, the second from the first's published weights --------------------------
def _datastore(root):
    from lib.monailabel_patches.atomic_datastore import AtomicLocalDatastore

    studies = os.path.join(root, "studies")
    os.makedirs(studies)
    ds = AtomicLocalDatastore(studies, extensions=("*.nii.gz",))
    for i in range(2):
        img, lab, aff = toy(seed=20 + i, shift=i)
        _nifti(os.path.join(root, f"img{i}.nii.gz"), img.astype(np.int16), aff)
        _nifti(os.path.join(root, f"lab{i}.nii.gz"), (lab == 1).astype(np.uint8), aff)
        ds.add_image(f"img{i}", os.path.join(root, f"img{i}.nii.gz"), {})
        ds.save_label(f"img{i}", os.path.join(root, f"lab{i}.nii.gz"), "final",
                      {"label_info": [{"name": "spleen", "idx": 1}]})
    return ds


def _task(root, atlas_folder=None, refiner=None):
    from lib.trainers.ensam_train import EnsamTrain
    from lib.weights import save_artefact

    model = os.path.join(root, "model")
    os.makedirs(model, exist_ok=True)
    shipped = os.path.join(model, "pretrained_ensam.pt")
    net = tiny_net(1)
    save_artefact(shipped, net.state_dict(), {"network": net.config.to_dict()}, copies=False, refiner=refiner)
    return EnsamTrain(model, [shipped, os.path.join(model, "ensam.pt")], atlas_folder=atlas_folder), shipped


ROUND = {"max_steps": 4, "max_seconds": 0, "concept": False, "labels": "spleen", "val_split": 0, "optimizer": "adamw",
         "learning_rate": 3e-3, "device": "cpu", "rehearsal": 0, "anchor": 0.3}


def test_two_rounds_stay_near_the_shipped_weights_with_the_anchor_to_shipped(tmp_path):
    """Round 2 starts from round 1's published weights (``start_from`` latest); with ``anchor_to`` ``shipped`` it ends nearer the shipped
    weights than with ``start`` (which pulls toward round 1's weights, so the rounds drift)."""
    from lib.weights import load_artefact

    ds = _datastore(str(tmp_path))
    ends = {}
    for target in ("shipped", "start"):
        task, shipped = _task(str(tmp_path / target), atlas_folder="")
        ref = load_artefact(shipped).state_dict
        for _ in range(2):
            stats = task(dict(ROUND, anchor_to=target, start_from="latest"), ds)
            assert stats["status"] == "DONE"
        art = load_artefact(os.path.join(str(tmp_path / target), "model", "ensam.pt"))
        assert art.meta["forgetting_guard"]["anchor_target"] == ("pretrained_ensam.pt" if target == "shipped"
                                                                 else "start")
        ends[target] = sum(float((v - ref[k]).norm()) for k, v in art.state_dict.items() if k in ref)
    assert 0 < ends["shipped"] < 0.85 * ends["start"], ends


def test_start_from_shipped_trains_every_round_from_the_shipped_weights(tmp_path):
    """``start_from`` ``shipped``: round 2 starts again from the shipped weights (not round 1's published ones), so
    two rounds on the same labels and seed publish the same weights (the default); ``latest`` builds on round 1."""
    from lib.weights import load_artefact

    ds = _datastore(str(tmp_path))
    published = {}
    for start in ("shipped", "latest"):
        task, _ = _task(str(tmp_path / start), atlas_folder="")
        assert task.parse_request({})["start_from"] == "shipped"
        arts = []
        for _ in range(2):
            stats = task(dict(ROUND, start_from=start), ds)
            assert stats["status"] == "DONE"
            arts.append(load_artefact(os.path.join(str(tmp_path / start), "model", "ensam.pt")))
        assert arts[1].meta["trained_from"] == ("pretrained_ensam.pt" if start == "shipped" else "ensam.pt")
        published[start] = max(float((arts[1].state_dict[k].float() - v.float()).abs().max())
                               for k, v in arts[0].state_dict.items())
    assert published["shipped"] < 1e-6 < published["latest"], published
    with pytest.raises(ValueError, match="start_from"):
        task.parse_request({"start_from": "yesterday"})


def test_the_train_task_forces_bf16_on_or_off_and_records_it(tmp_path):
    """``bf16`` ``off`` trains in float32 even where the CPU has bf16 units, ``on`` autocasts anyway; the statistics
    say which ran; ``auto`` (the default) is the engine's rule; any other value is refused before anything starts."""
    ds = _datastore(str(tmp_path))
    task, _ = _task(str(tmp_path / "app"), atlas_folder="")
    assert task.parse_request({})["bf16"] == "auto"
    for value, want in (("off", False), ("on", True)):
        stats = task(dict(ROUND, max_steps=2, bf16=value), ds)
        assert stats["status"] == "DONE" and stats["bf16"] is want, stats
    with pytest.raises(ValueError, match="bf16"):
        task.parse_request({"bf16": "half"})


def test_the_train_task_rehearses_the_atlases_and_refuses_bad_values(tmp_path):
    ds = _datastore(str(tmp_path))
    folder = _atlas_folder(str(tmp_path / "atlases"), n=2)
    task, _ = _task(str(tmp_path / "app"), atlas_folder=folder)
    stats = task(dict(ROUND, max_steps=10, rehearsal_atlases=0.5), ds)
    guard = stats["forgetting_guard"]
    assert sorted(guard["atlases"]) == ["a0", "a1"] and guard["rehearsal_atlases"] == 0.5
    assert 1 <= stats["atlas_steps"] <= 9, stats
    # no atlas folder: the run goes on without atlas rehearsal, and says so
    bare, _ = _task(str(tmp_path / "bare"), atlas_folder="")
    stats = bare(dict(ROUND, max_steps=2, rehearsal_atlases=0.5), ds)
    assert stats["forgetting_guard"]["rehearsal_atlases"] == 0.0 and stats["atlas_steps"] == 0
    # the request is checked before anything starts (the server answers 400 with the message)
    for bad in ({"rehearsal_atlases": 1}, {"rehearsal_atlases": -0.2}, {"rehearsal_atlases": "nan"},
                {"rehearsal_atlases": "lots"}):
        with pytest.raises(ValueError, match="rehearsal_atlases"):
            task.parse_request(bad)
    with pytest.raises(ValueError, match="anchor_to"):
        task.parse_request({"anchor_to": "elsewhere"})
    req = task.parse_request({})
    assert req["anchor_to"] == "shipped" and 0 < req["rehearsal_atlases"] < 1


def test_the_shipped_refiner_is_kept_beside_the_tuned_weights_unless_asked_not_to(tmp_path):
    """Weights with a refiner (the network trained for corrective steps) keep it through a round, untuned, so the
    corrections after fine-tuning are answered as before it (``keep_refiner``, default true); false drops it."""
    from lib.weights import load_artefact

    ds = _datastore(str(tmp_path))
    refiner = {k: v + 0.01 for k, v in tiny_net(2).state_dict().items()}
    for keep in (True, False):
        task, shipped = _task(str(tmp_path / str(keep)), atlas_folder="", refiner=refiner)
        assert task.parse_request({})["keep_refiner"] is True
        stats = task(dict(ROUND, max_steps=2, keep_refiner=keep), ds)
        assert stats["status"] == "DONE"
        art = load_artefact(os.path.join(str(tmp_path / str(keep)), "model", "ensam.pt"))
        assert art.meta["refiner"] == ("kept" if keep else "dropped")
        if keep:
            assert set(art.refiner) == set(refiner)
            assert all(torch.allclose(art.refiner_float32()[k], refiner[k].float(), atol=1e-2) for k in refiner)
            assert any(not torch.equal(art.state_dict[k], refiner[k]) for k in refiner)  # the main weights are not it
        else:
            assert art.refiner is None
    with pytest.raises(ValueError, match="keep_refiner"):
        task.parse_request({"keep_refiner": "perhaps"})


def test_the_train_task_guards_the_reference_atlases_and_records_the_blend(tmp_path):
    """``reference_tolerance`` (default 0.02): after the round, the box DSC on the reference atlases of the
    published weights is within the tolerance of the shipped weights' (blended back toward them when needed), and
    the statistics and the artefact say which blend was published; 1 turns the guard off; a bad value is refused."""
    from lib.training.reference_guard import ALPHAS
    from lib.weights import load_artefact

    ds = _datastore(str(tmp_path))
    folder = _atlas_folder(str(tmp_path / "atlases"), n=2)
    task, _ = _task(str(tmp_path / "app"), atlas_folder=folder)
    assert task.parse_request({})["reference_tolerance"] == 0.02
    stats = task(dict(ROUND, max_steps=6, learning_rate=3e-2, reference_tolerance=0.0), ds)
    rec = stats["reference_guard"]
    assert stats["status"] == "DONE" and rec["alpha"] in ALPHAS and rec["cases"] >= 2, stats
    assert set(rec["reference_base"]) == {"CT"}, rec  # the toy atlases are CT
    assert rec["reference_after"]["CT"] >= rec["reference_base"]["CT"], rec  # tolerance 0: never below the shipped
    art = load_artefact(os.path.join(str(tmp_path / "app"), "model", "ensam.pt"))
    assert art.meta["reference_guard"] == rec and art.meta["forgetting_guard"]["reference_tolerance"] == 0.0
    stats = task(dict(ROUND, max_steps=2, reference_tolerance=1), ds)
    assert "reference_guard" not in stats  # off
    for bad in ({"reference_tolerance": 1.5}, {"reference_tolerance": -0.1}, {"reference_tolerance": "nan"}):
        with pytest.raises(ValueError, match="reference_tolerance"):
            task.parse_request(bad)
