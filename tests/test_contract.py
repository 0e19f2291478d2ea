"""The training/inference contract (lib.contract): one object in the weights' JSON, read by the engine and the
training loop; a mismatch is refused with a message naming the fields."""

import json

import numpy as np
import pytest
import torch

from lib.contract import Contract, ContractError, check_same, legacy_contract, read_contract
from lib.engine import EngineConfig, EnsamEngine
from lib.geometry import RoiPolicy
from lib.network import NetworkConfig, build_network
from lib.training.finetune import finetune
from lib.training.loop import LoopConfig
from lib.training.pretrain import PretrainConfig, export_weights

torch.set_num_threads(1)
TINY = dict(filters=4, blocks=(1, 1, 1), heads=2, depth=1, roi_size=(16, 16, 16), num_labels=8)


def _weights(tmp_path, contract: Contract | None, name="w.pt"):
    torch.manual_seed(0)
    net = build_network(NetworkConfig(**TINY))
    meta = {"network": net.config.to_dict()}
    if contract is not None:
        meta["contract"] = contract.to_dict()
    path = tmp_path / name
    export_weights(net, path, meta)
    return str(path)


def test_round_trip_through_json():
    c = Contract(roi=RoiPolicy(model_shape=(16, 16, 16), max_aspect=3.0, click_extent_mm=80.0), click_sigma=2.5,
                 label_spacing_mm=4.0)
    assert Contract.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ContractError, match="unknown contract fields"):
        Contract.from_dict({**c.to_dict(), "click_sigmaa": 2.0})
    with pytest.raises(ContractError, match="roi fields"):
        Contract.from_dict({**c.to_dict(), "roi": {"max_aspekt": 2}})
    with pytest.raises(ContractError, match="intensity"):
        Contract(intensity="zscore")


def test_engine_and_training_loop_read_the_same_contract_from_the_weights(tmp_path):
    c = Contract(roi=RoiPolicy(model_shape=(16, 16, 16), max_aspect=3.0, click_extent_mm=40.0), click_sigma=1.5)
    w = _weights(tmp_path, c)
    assert read_contract(w) == c
    eng = EnsamEngine(weights=w, config=EngineConfig(max_zoom=0))
    assert eng.contract == c
    # a pre-training run initialised from these weights, with the same overrides, trains under the same contract
    cfg = PretrainConfig(network=TINY, contract={"roi": {"max_aspect": 3.0, "click_extent_mm": 40.0},
                                                 "click_sigma": 1.5})
    assert cfg.loop_config().contract == c
    # and the engine uses it: a lone click gets the contract's view (40 mm at 1 mm voxels -> 40 voxels)
    img = np.random.default_rng(0).normal(size=(60, 60, 60)).astype(np.float32)
    eng.segment(img, np.eye(4), points=[[30, 30, 30]], point_labels=[1])
    assert eng.last_info["roi_size"] == [40, 40, 40]


def test_mismatch_is_refused_with_the_field_named(tmp_path):
    c = Contract(roi=RoiPolicy(model_shape=(16, 16, 16), max_aspect=3.0))
    w = _weights(tmp_path, c)
    other = Contract(roi=RoiPolicy(model_shape=(16, 16, 16), max_aspect=2.0), click_sigma=3.0)
    with pytest.raises(ContractError, match=r"roi\.max_aspect: 2\.0 vs 3\.0.*click_sigma"):
        EnsamEngine(weights=w, contract=other)
    with pytest.raises(ContractError, match="model grid"):
        EnsamEngine(network=build_network(NetworkConfig(**TINY)), contract=Contract())  # 64^3 vs the 16^3 net
    net = build_network(NetworkConfig(**TINY))
    with pytest.raises(ContractError, match="training loop.*weights being tuned"):
        finetune(net, [], max_seconds=1, loop=LoopConfig(contract=other), contract=c)
    with pytest.raises(SystemExit, match="max_aspect"):
        PretrainConfig(network=TINY, loop={"roi_max_aspect": 2.0}).loop_config()
    check_same(c, Contract.from_dict(c.to_dict()), "a", "b")  # equal contracts pass


def test_weights_without_a_contract_read_as_the_legacy_one(tmp_path):
    w = _weights(tmp_path, None)
    c = read_contract(w)
    assert c == legacy_contract(TINY) and c.roi.max_aspect == 4.0 and c.model_shape == (16, 16, 16)
    assert EnsamEngine(weights=w).contract == c
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"network": TINY, "contract": {"roi": {"model_shape": [8, 8, 8]}}}))
    torch.save({}, tmp_path / "bad.pt")  # a legacy (plain state_dict) file: its contract is read from bad.json
    with pytest.raises(ContractError, match="bad.pt.*model grid"):
        read_contract(str(tmp_path / "bad.pt"))
