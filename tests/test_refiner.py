"""Weights with a refiner: a second set of weights of the same network in the artefact (``lib.weights``), which
the engine uses for the steps that start from a previous mask while the main weights answer the first prompt."""

import os

import numpy as np
import pytest
import torch

from lib.contract import contract_for_network
from lib.engine import EngineConfig, EnsamEngine
from lib.network import NetworkConfig, build_network
from lib.weights import WeightsError, average_weights, combine_with_refiner, load_artefact, save_artefact
from test_engine import volume  # noqa: F401 - the engine tests' volume (a bright block in noise), a fixture

torch.set_num_threads(1)
CFG = NetworkConfig(filters=4, blocks=(1, 1, 1), heads=2, depth=1, roi_size=(24, 24, 24), num_labels=8)
BOX = [[20, 39, 20, 44, 10, 19]]


def _state(seed: int) -> dict:
    torch.manual_seed(seed)
    return build_network(CFG).state_dict()


def _meta(cfg: NetworkConfig = CFG) -> dict:
    return {"network": cfg.to_dict(), "contract": contract_for_network(cfg).to_dict()}


def _bf16(sd: dict) -> dict:
    """The values a refiner stored in bf16 is computed with (float32 of the bf16 numbers)."""
    return {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("refiner")
    a, b = str(d / "a.pt"), str(d / "b.pt")
    save_artefact(a, _state(0), dict(_meta(), step=10, val_box_dsc=0.5))
    save_artefact(b, _state(1), dict(_meta(), step=20, run="runs/other"))
    b_rounded = save_artefact(str(d / "b_bf16.pt"), _bf16(_state(1)), _meta())
    both = combine_with_refiner(a, b, str(d / "both.pt"), note={"why": "test"})
    return {"a": a, "b": b, "b_bf16": b_rounded, "both": both, "dir": d}


def test_a_refiner_round_trips_in_bf16_and_keeps_the_main_weights(files):
    art, main = load_artefact(files["both"]), load_artefact(files["a"])
    assert art.refiner is not None and set(art.refiner) == set(art.state_dict)
    floats = [k for k, v in art.refiner.items() if v.is_floating_point()]
    assert floats and all(art.refiner[k].dtype == torch.bfloat16 for k in floats)
    assert all(torch.equal(art.state_dict[k], main.state_dict[k]) for k in main.state_dict)
    assert art.meta["refiner"]["from"] == "b.pt" and art.meta["refiner"]["step"] == 20
    assert art.meta["refiner"]["why"] == "test" and art.meta["step"] == 10
    assert load_artefact(files["a"]).refiner is None
    # about 1.5x the main weights' size (the refiner in bf16)
    assert 1.3 < os.path.getsize(files["both"]) / os.path.getsize(files["a"]) < 1.7


def test_a_refiner_of_another_network_is_refused(files, tmp_path):
    sd = _state(0)
    other = {k: v for k, v in sd.items() if k != next(iter(sd))}
    with pytest.raises(WeightsError, match="not those of the same network"):
        save_artefact(str(tmp_path / "x.pt"), sd, _meta(), refiner=other)
    k = next(k for k, v in sd.items() if v.ndim == 1)
    bad = dict(sd, **{k: torch.zeros(sd[k].shape[0] + 1)})
    with pytest.raises(WeightsError, match="has shape"):
        save_artefact(str(tmp_path / "y.pt"), sd, _meta(), refiner=bad)
    assert not os.path.exists(tmp_path / "x.pt") and not os.path.exists(tmp_path / "y.pt")
    # a file written by hand with a mismatched refiner is refused when read, not half-used
    torch.save({"format": "ensam-weights/1", "state_dict": sd, "meta": _meta(), "refiner_state_dict": other},
               str(tmp_path / "z.pt"))
    with pytest.raises(WeightsError, match="refiner"):
        load_artefact(str(tmp_path / "z.pt"))
    # combining weights trained under another contract (or another network) is refused
    cfg2 = NetworkConfig(**{**CFG.to_dict(), "roi_size": (32, 32, 32)})
    save_artefact(str(tmp_path / "c.pt"), _state(2), _meta(cfg2))
    with pytest.raises(WeightsError, match="differs"):
        combine_with_refiner(files["a"], str(tmp_path / "c.pt"), str(tmp_path / "out.pt"))
    with pytest.raises(WeightsError, match="already carries"):
        combine_with_refiner(files["both"], files["b"], str(tmp_path / "out2.pt"))


def test_a_release_replaces_the_refiner_and_keeps_the_main_weights(files, tmp_path):
    """A release that changes only the refiner: the shipped artefact's main weights and meta stay, the new
    refiner and the release's own fields (``meta_update``) come in."""
    out = combine_with_refiner(files["both"], files["a"], str(tmp_path / "r7.pt"), replace=True,
                               meta_update={"release": 7, "evaluation": {"box": 0.5}})
    art, before = load_artefact(out), load_artefact(files["both"])
    assert all(torch.equal(art.state_dict[k], before.state_dict[k]) for k in before.state_dict)
    main = _bf16(load_artefact(files["a"]).state_dict)
    assert all(torch.equal(art.refiner[k].float(), main[k]) for k in main)  # the new refiner, not the old one
    assert any(not torch.equal(art.refiner[k].float(), before.refiner[k].float()) for k in main)
    assert art.meta["release"] == 7 and art.meta["evaluation"] == {"box": 0.5}
    assert art.meta["refiner"]["from"] == "a.pt" and art.meta["step"] == 10


def test_checkpoints_of_one_network_average_and_others_are_refused(files, tmp_path):
    out = average_weights([files["a"], files["b"]], str(tmp_path / "mean.pt"))
    art, a, b = load_artefact(out), load_artefact(files["a"]), load_artefact(files["b"])
    for k, v in art.state_dict.items():
        if v.is_floating_point():
            assert torch.allclose(v, (a.state_dict[k] + b.state_dict[k]) / 2, atol=1e-6)
        else:
            assert torch.equal(v, a.state_dict[k])
    assert art.meta["step"] == "mean of steps 10 + 20"
    assert [d["step"] for d in art.meta["averaged_from"]] == [10, 20]
    assert "val_box_dsc" not in art.meta and art.meta["averaged_from"][0]["val_box_dsc"] == 0.5
    cfg2 = NetworkConfig(**{**CFG.to_dict(), "roi_size": (32, 32, 32)})
    save_artefact(str(tmp_path / "c.pt"), _state(2), _meta(cfg2))
    with pytest.raises(WeightsError, match="differs"):
        average_weights([files["a"], str(tmp_path / "c.pt")], str(tmp_path / "x.pt"))
    with pytest.raises(WeightsError, match="carries a refiner"):
        average_weights([files["a"], files["both"]], str(tmp_path / "y.pt"))
    with pytest.raises(WeightsError, match="at least two"):
        average_weights([files["a"]], str(tmp_path / "z.pt"))
    assert not any(os.path.exists(tmp_path / n) for n in ("x.pt", "y.pt", "z.pt"))


def test_the_refiner_answers_corrective_steps_and_the_main_weights_the_first(files, volume):
    img, aff = volume
    cfg = EngineConfig(max_zoom=0, boundary_cut=None, refiner_warm=False)
    eng_a = EnsamEngine(weights=files["a"], config=cfg)
    eng_b = EnsamEngine(weights=files["b_bf16"], config=cfg)
    eng = EnsamEngine(weights=files["both"], config=cfg)
    assert eng_a.refiner is None and eng.refiner is not None

    first, info = eng.segment_step(img, aff, boxes=BOX)
    assert info["weights"] == "main"
    first_a, info_a = eng_a.segment_step(img, aff, boxes=BOX)
    assert np.array_equal(first, first_a)
    _, info_b = eng_b.segment_step(img, aff, boxes=BOX)  # the same ROIs encoded before the corrective step
    clicks = dict(points=[[30, 30, 15]], point_labels=[1])
    misses = eng.cache.misses
    second = eng.segment(img, aff, boxes=BOX, prev_mask=first, prev_info=info, **clicks)
    assert eng.last_info["weights"] == "refiner"
    by_b = eng_b.segment(img, aff, boxes=BOX, prev_mask=first, prev_info=info_b, **clicks)
    by_a = eng_a.segment(img, aff, boxes=BOX, prev_mask=first, prev_info=info_a, **clicks)
    assert not np.array_equal(by_a, by_b), "the two networks must answer differently for this test to tell"
    assert np.array_equal(second, by_b)
    assert eng.cache.misses == misses + 1  # the refiner encodes the ROI once ...
    eng.segment(img, aff, boxes=BOX, prev_mask=second, points=[[30, 30, 15], [22, 22, 12]], point_labels=[1, 0],
                prev_info=eng.last_info)
    assert eng.cache.misses == misses + 1 and eng.last_info["weights"] == "refiner"  # ... then reuses it
    # a lone click (no previous mask) is a first prompt: the main weights
    eng.segment(img, aff, points=[[30, 30, 15]], point_labels=[1])
    assert eng.last_info["weights"] == "main"


def test_weights_published_without_a_refiner_take_every_step(files, volume, tmp_path):
    """What the train task publishes (one network): the reloaded engine drops the refiner."""
    img, aff = volume
    path = str(tmp_path / "live.pt")
    combine_with_refiner(files["a"], files["b"], path)
    from lib.infers.engine_provider import EngineProvider  # the production reload path (the app's provider)

    provider = EngineProvider([path], engine_kwargs={"config": EngineConfig(max_zoom=0, boundary_cut=None)})
    eng = provider.get("cpu")
    first = eng.segment(img, aff, boxes=BOX)
    eng.segment(img, aff, boxes=BOX, prev_mask=first, points=[[30, 30, 15]], point_labels=[1])
    assert eng.last_info["weights"] == "refiner"
    art = load_artefact(files["b"])
    save_artefact(path, art.state_dict, art.meta)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10 ** 9))
    eng = provider.get("cpu")
    assert provider.loads == 2 and eng.refiner is None
    eng.segment(img, aff, boxes=BOX, prev_mask=first, points=[[30, 30, 15]], point_labels=[1])
    assert eng.last_info["weights"] == "main"


def test_pretraining_can_start_from_the_refiner(files):
    """``init_refiner``: a run continues the refiner's weights (as float32), not the main ones; weights without a
    refiner are refused for it."""
    from lib.training.pretrain import init_weights

    net = build_network(CFG)
    init_weights(net, files["both"], refiner=True)
    want = _bf16(_state(1))
    assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
    init_weights(net, files["both"])
    main = _state(0)
    assert all(torch.equal(v, main[k]) for k, v in net.state_dict().items())
    with pytest.raises(SystemExit, match="no refiner"):
        init_weights(net, files["a"], refiner=True)


def test_the_first_prompt_warms_the_refiner_so_corrections_only_decode(files, volume):
    img, aff = volume
    eng = EnsamEngine(weights=files["both"], config=EngineConfig(max_zoom=0, boundary_cut=None))
    first, info = eng.segment_step(img, aff, boxes=BOX)
    assert eng.cache.misses == 2  # the ROI by the main weights and by the refiner
    second = eng.segment(img, aff, boxes=BOX, prev_mask=first, points=[[30, 30, 15]], point_labels=[1],
                         prev_info=info)
    assert eng.cache.misses == 2 and eng.last_info["weights"] == "refiner" and "encode_s" not in eng.last_info
    cold = EnsamEngine(weights=files["both"], config=EngineConfig(max_zoom=0, boundary_cut=None, refiner_warm=False))
    _, cold_info = cold.segment_step(img, aff, boxes=BOX)
    # the same answer, the encoding paid earlier
    assert np.array_equal(second, cold.segment(img, aff, boxes=BOX, prev_mask=first, points=[[30, 30, 15]],
                                               point_labels=[1], prev_info=cold_info))
