"""The reference guard (issue 29, item 2): a fine-tuning round never publishes weights whose box DSC on the
reference atlases falls more than the tolerance below the shipped weights'; past it, the published weights are
blended back toward the shipped ones (:mod:`lib.training.reference_guard`)."""

import os

import pytest
import torch

from lib.training.finetune import atlas_volumes
from lib.training.loop import LoopConfig
from lib.training.reference_guard import ALPHAS, blend_state, blend_within, reference_cases, reference_keys

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "apps", "ensam", "model", "pretrained_ensam.pt")
ATLASES = os.path.join(REPO, "sample-datasets", "train")


def test_blend_state_interpolates_floating_tensors_and_keeps_the_rest():
    base = {"w": torch.zeros(2, 3), "n": torch.tensor([3]), "odd": torch.zeros(4)}
    tuned = {"w": torch.ones(2, 3), "n": torch.tensor([7]), "odd": torch.ones(5), "new": torch.full((2,), 2.0)}
    out = blend_state(base, tuned, 0.25)
    assert torch.allclose(out["w"], torch.full((2, 3), 0.25))
    assert out["n"].item() == 7  # an integer buffer is the tuned one's
    assert torch.equal(out["odd"], tuned["odd"]) and torch.equal(out["new"], tuned["new"])  # shape differs / absent
    assert torch.equal(blend_state(base, tuned, 0.0)["w"], base["w"])
    assert torch.equal(blend_state(base, tuned, 1.0)["w"], tuned["w"])


def _volumes():
    return [v for v in atlas_volumes(ATLASES, seed=0) if v.name in ("ct_small", "tptbox_spine_ct", "tptbox_spine_mr")]


@pytest.fixture(scope="module")
def shipped_and_cases():
    from lib.contract import contract_for_network, read_contract
    from lib.engine import load_network
    from lib.weights import load_artefact

    art = load_artefact(SHIPPED)
    net = load_network(art, None, "cpu")
    cfg = LoopConfig(contract=contract_for_network(net.config, read_contract(art, net.config)))
    vols = _volumes()
    assert {v.name for v in vols} == {"ct_small", "tptbox_spine_ct", "tptbox_spine_mr"}
    keys = reference_keys(vols, per_modality=4)
    cases, groups = reference_cases(vols, cfg, keys)
    return net, cfg, keys, cases, groups


def test_reference_structures_are_fixed_per_modality_and_held_out_of_the_rehearsal(shipped_and_cases):
    from lib.training.finetune import _atlas_sampler

    net, cfg, keys, cases, groups = shipped_and_cases
    # 4 per modality, but at most half of a modality's structures: the spine MR crop has 7, so 3 (4 stay rehearsed)
    assert sorted(groups) == ["CT"] * 4 + ["MR"] * 3 and len(cases) == 7
    ct = [name for name, _ in keys if name != "tptbox_spine_mr"]
    assert set(ct) == {"ct_small", "tptbox_spine_ct"}  # taken in turn from each CT volume
    assert reference_keys(list(reversed(_volumes())), per_modality=4) == keys  # the same every round
    vols = _volumes()
    drawn = {(vols[vi].name, int(lab)) for vi, lab, _, _ in _atlas_sampler(vols, 128, exclude=keys).structures}
    everything = {(vols[vi].name, int(lab)) for vi, lab, _, _ in _atlas_sampler(vols, 128).structures}
    assert not drawn & set(keys) and set(keys) & everything and len(drawn) > 0  # the exclusion removed something
    assert everything - drawn == set(keys) & everything  # nothing else is held out


def test_damaged_weights_are_blended_back_within_the_tolerance_and_good_ones_kept(shipped_and_cases):
    net, cfg, keys, cases, groups = shipped_and_cases
    base = {k: v.clone() for k, v in net.state_dict().items()}
    # weights that forgot: every parameter moved far (as a round on another modality can do)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.numel() > 1:
                p.add_(torch.randn_like(p) * 0.5 * p.std())
    damaged = {k: v.clone() for k, v in net.state_dict().items()}
    rec = blend_within(net, base, cases, groups, tolerance=0.02, cfg=cfg)
    assert set(rec["reference_base"]) == {"CT", "MR"}, rec
    assert any(rec["reference_tuned"][g] < rec["reference_base"][g] - 0.02 for g in "CT MR".split()), rec  # damage
    assert rec["alpha"] in ALPHAS and rec["alpha"] < 1.0, rec  # ...so the published weights are a blend
    assert all(rec["reference_after"][g] >= rec["reference_base"][g] - 0.02 for g in ("CT", "MR")), rec
    want = blend_state(base, damaged, rec["alpha"])
    assert all(torch.allclose(v, want[k]) for k, v in net.state_dict().items())  # the network holds that blend
    # weights within the tolerance are published as they are
    net.load_state_dict(base)
    rec = blend_within(net, base, cases, groups, tolerance=0.02, cfg=cfg)
    assert rec["alpha"] == 1.0 and rec["reference_after"] == rec["reference_base"], rec
