"""EnsamEngine without a server: output on the original grid, encoding cache hits and invalidation,
AutoZoom, weights reload, clear errors."""

import os
import time

import numpy as np
import pytest
import torch

from lib.contract import Contract
from lib.engine import EngineConfig, EnsamEngine, PromptError
from lib.geometry import RoiPolicy
from lib.network import NetworkConfig, build_network

torch.set_num_threads(1)
CFG = NetworkConfig(filters=4, blocks=(1, 1, 1), heads=2, depth=1, roi_size=(24, 24, 24), num_labels=8)


def _engine(**kw):
    torch.manual_seed(0)
    kw.setdefault("config", EngineConfig(max_zoom=0))  # an untrained network's masks touch borders at random
    return EnsamEngine(network=build_network(CFG), **kw)


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 20, (70, 60, 30)).astype(np.int16)
    img[20:40, 20:45, 10:20] += 300
    return img, np.diag([0.9, 0.9, 2.5, 1.0])


def test_segment_returns_mask_on_original_grid_and_is_deterministic(volume):
    img, aff = volume
    eng = _engine()
    a = eng.segment(img, aff, boxes=[[20, 39, 20, 44, 10, 19]])
    b = eng.segment(img, aff, boxes=[[39, 20, 44, 20, 19, 10]])
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_refinement_click_reuses_the_encoding(volume):
    img, aff = volume
    eng = _engine()
    m = eng.segment(img, aff, boxes=[[20, 39, 20, 44, 10, 19]])
    assert eng.cache.misses >= 1 and eng.cache.hits == 0
    misses = eng.cache.misses
    eng.segment(img, aff, boxes=[[20, 39, 20, 44, 10, 19]], points=[[30, 30, 15]], point_labels=[1], prev_mask=m)
    eng.segment(img, aff, boxes=[[20, 39, 20, 44, 10, 19]], points=[[30, 30, 15], [22, 22, 12]],
                point_labels=[1, 0], prev_mask=m)
    assert eng.cache.hits >= 2 and eng.cache.misses == misses


def test_cache_invalidated_by_new_image_and_new_weights(volume):
    img, aff = volume
    eng = _engine()
    box = [[20, 39, 20, 44, 10, 19]]
    eng.segment(img, aff, boxes=box)
    m0 = eng.cache.misses
    other = img.copy()
    other[0, 0, 0] += 1  # sampled voxel: a different image
    other[::2, ::2, ::2] += 5
    eng.segment(other, aff, boxes=box)
    assert eng.cache.misses == m0 + 1
    eng.set_network(build_network(CFG))
    eng.segment(img, aff, boxes=box)
    assert eng.cache.misses == m0 + 2 and len(eng.cache) == 1


def test_cache_is_bounded_in_bytes(volume):
    img, aff = volume
    eng = _engine(config=EngineConfig(cache_bytes=1, max_zoom=0))
    for k in range(3):
        eng.segment(img, aff, boxes=[[5 + k, 30, 5, 30, 5, 20]], image_key=f"img{k}")
    assert len(eng.cache) == 1


def test_several_boxes_are_several_objects(volume):
    img, aff = volume
    eng = _engine()
    b1, b2 = [2, 10, 2, 10, 2, 8], [50, 65, 40, 55, 15, 25]
    one = eng.segment(img, aff, boxes=[b1])
    two = eng.segment(img, aff, boxes=[b2])
    info_two = dict(eng.last_info)
    both = eng.segment(img, aff, boxes=[b1, b2])
    assert np.array_equal(both, one | two)
    # the answer reports EVERY object's region (issue 28: only the last box's info was reported)
    objects = eng.last_info["objects"]
    assert len(objects) == 2 and objects[1]["roi_start"] == info_two["roi_start"]
    assert objects[0]["roi_start"] != objects[1]["roi_start"] and eng.last_info["roi_start"] == objects[0]["roi_start"]


def test_autozoom_grows_roi_when_mask_touches_border(volume):
    img, aff = volume
    eng = _engine(config=EngineConfig(max_zoom=2),
                  contract=Contract(roi=RoiPolicy(model_shape=CFG.roi_size, click_extent_mm=10.0, min_extent_mm=5.0)))
    # force "all foreground" so the mask always touches the ROI border
    torch.nn.init.constant_(eng.network.decoder.bias.bias, 100.0)
    torch.nn.init.zeros_(eng.network.decoder.bias.weight)
    eng.set_network(eng.network)
    m = eng.segment(img, aff, points=[[35, 30, 15]], point_labels=[1])
    assert eng.last_info["zooms"] == 2
    assert eng.last_info["roi_size"][0] >= int(10 / 0.9 * 1.5 * 1.5)
    assert m.sum() > 0


def test_weights_file_is_reloaded_when_it_changes(tmp_path, volume):
    img, aff = volume
    path = str(tmp_path / "w.pt")
    def constant_net(value):
        net = build_network(CFG)
        torch.nn.init.constant_(net.decoder.bias.bias, value)
        torch.nn.init.zeros_(net.decoder.bias.weight)
        torch.nn.init.zeros_(net.decoder.hyper[-1].weight)
        torch.nn.init.zeros_(net.decoder.hyper[-1].bias)
        return net

    from lib.infers.engine_provider import EngineProvider  # the production reload path (the app's provider)

    torch.save(constant_net(100.0).state_dict(), path)
    provider = EngineProvider([path], network_config=CFG.to_dict())
    eng = provider.get("cpu")
    a = eng.segment(img, aff, boxes=[[20, 39, 20, 44, 10, 19]])
    assert provider.get("cpu") is eng and provider.loads == 1  # unchanged weights: the same engine
    torch.save(constant_net(-100.0).state_dict(), path)
    os.utime(path, (time.time() + 5, time.time() + 5))
    eng2 = provider.get("cpu")
    assert eng2 is not eng and provider.loads == 2
    b = eng2.segment(img, aff, boxes=[[20, 39, 20, 44, 10, 19]])
    assert a.sum() > 0 and b.sum() == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(points=[[70, 0, 0]], point_labels=[1]), "outside the image"),
    (dict(points=[[1, 2, 3]], point_labels=[1, 0]), "point labels"),
    (dict(points=[[1, 2, 3]], point_labels=[2]), "1 .foreground. or 0"),
    (dict(boxes=[[1, 2, 3]]), "must be"),
    (dict(), "no prompt"),
    (dict(points=[[1, 2, 3]], point_labels=[0]), "no prompt"),
    (dict(boxes=[[1, 5, 1, 5, 1, 5]], prev_mask=np.zeros((3, 3, 3))), "previous mask shape"),
])
def test_bad_prompts(volume, kwargs, message):
    img, aff = volume
    with pytest.raises(PromptError, match=message):
        _engine().segment(img, aff, **kwargs)


def test_previous_mask_outside_the_roi_is_kept(volume):
    img, aff = volume
    eng = _engine()
    prev = np.zeros(img.shape, np.uint8)
    prev[60:65, 50:55, 25:28] = 1  # far away from the boxes
    out = eng.segment(img, aff, boxes=[[2, 10, 2, 10, 2, 8], [20, 30, 20, 30, 10, 15]], prev_mask=prev)
    assert out[60:65, 50:55, 25:28].all()  # each box's ROI leaves the rest of the previous mask as it was


def test_prompt_free_label_segmentation_shape(volume):
    img, aff = volume
    eng = _engine()
    m = eng.segment_label(img, aff, 3)
    assert m.shape == img.shape and m.dtype == np.uint8
    with pytest.raises(PromptError, match="out of range"):
        eng.segment_label(img, aff, 99)


def test_several_labels_in_one_pass_equal_one_at_a_time(volume):
    """segment_labels encodes each window once and decodes the label tokens batched (in groups): the masks are
    those of one segment_label call per name."""
    img, aff = volume
    # an untrained network's logits are mostly below -2: this threshold gives masks of a few % that differ
    # between the label tokens, so a mix-up of tokens, windows or batch entries shows
    eng = _engine(config=EngineConfig(max_zoom=0, threshold=-1.7))
    many = eng.segment_labels(img, aff, [3, 5, 7, 3], labels_per_pass=2)
    assert sorted(many) == [3, 5, 7]
    assert all(0.01 < many[i].mean() < 0.5 for i in many) and (many[3] != many[7]).sum() > 1000
    for i in (3, 5, 7):
        one = eng.segment_label(img, aff, i)
        assert many[i].shape == img.shape and np.mean(many[i] == one) > 0.999, i
    assert eng.segment_labels(img, aff, []) == {}
    with pytest.raises(PromptError, match="out of range"):
        eng.segment_labels(img, aff, [3, 128])


def test_no_autozoom_when_a_box_bounds_the_object(volume):
    img, aff = volume
    eng = _engine(config=EngineConfig(max_zoom=2))
    torch.nn.init.constant_(eng.network.decoder.bias.bias, 100.0)  # all foreground: the mask touches every border
    torch.nn.init.zeros_(eng.network.decoder.bias.weight)
    eng.set_network(eng.network)
    eng.segment(img, aff, boxes=[[20, 39, 20, 44, 10, 19]])
    assert eng.last_info["zooms"] == 0 and eng.cache.misses == 1


def test_bf16_autocast_agrees_with_fp32(volume):
    img, aff = volume
    box = [[20, 39, 20, 44, 10, 19]]
    a = _engine(config=EngineConfig(max_zoom=0, bf16="off")).segment(img, aff, boxes=box)
    eng = _engine(config=EngineConfig(max_zoom=0, bf16="on"))
    b = eng.segment(img, aff, boxes=box)
    assert eng.bf16 and a.shape == b.shape
    assert (a != b).mean() < 0.01  # an untrained network: logits near 0 flip at a few voxels at most
    with pytest.raises(ValueError, match="bf16"):
        _engine(config=EngineConfig(bf16="maybe"))


def test_refinement_windows_only_for_weights_trained_for_them(volume):
    img, aff = volume
    box = [[5, 64, 5, 54, 2, 27]]  # ROI ~90 voxels across on a 24^3 grid: ~3.7 scan voxels per model voxel
    for refine, first, click in ((True, 2, 1), (False, 0, 0)):
        c = Contract(roi=RoiPolicy(model_shape=CFG.roi_size), refine=refine)
        eng = _engine(config=EngineConfig(max_zoom=0, refine_windows=2, refine_windows_click=1), contract=c)
        torch.nn.init.constant_(eng.network.decoder.bias.bias, 3.0)  # a non-empty mask with a boundary
        torch.nn.init.zeros_(eng.network.decoder.bias.weight)
        eng.set_network(eng.network)
        m = eng.segment(img, aff, boxes=box)
        assert eng.last_info["refine_windows"] == first and m.any()
        eng.segment(img, aff, boxes=box, points=[[30, 30, 15]], point_labels=[0], prev_mask=m)
        assert eng.last_info["refine_windows"] == click



def test_guarded_corrections_hold_the_previous_answer_only_with_a_box(volume):
    """``correction_reach`` mode "guard" (issue 27): with a box, a background click may change the previous answer
    only near itself (guard 0: every far change refused); a lone-click session is left to the network."""
    img, aff = volume
    plain = _engine(config=EngineConfig(max_zoom=0, boundary_cut=None))
    guarded = _engine(config=EngineConfig(max_zoom=0, boundary_cut=None, correction_reach=(1.0, 1.0, "guard", 0.0)))
    prev = np.zeros(img.shape, np.uint8)
    prev[18:42, 18:47, 8:22] = 1
    click = dict(points=[[21, 30, 15]], point_labels=[0], prev_mask=prev)  # 3 voxels inside prev's boundary
    assert np.array_equal(plain.segment(img, aff, **click), guarded.segment(img, aff, **click))  # no box
    box = [[20, 39, 20, 44, 10, 19]]
    free, held = plain.segment(img, aff, boxes=box, **click), guarded.segment(img, aff, boxes=box, **click)
    far = np.ones(img.shape, bool)
    far[14:29, 22:39, 7:24] = False  # beyond the click's reach (1 x 3 mm + 1 mm, anisotropic voxels)
    assert np.array_equal(held[far], prev[far])  # the previous answer stands away from the click
    assert not np.array_equal(free[far], prev[far])  # where the network alone changed it
    assert held[21, 30, 15] == free[21, 30, 15]  # the click's own voxel answered as the network does


def test_lone_correction_reach_is_the_rule_of_sessions_without_a_box(volume):
    """``lone_correction_reach`` (stop 36): the merge rule of corrective steps when no box bounds the object, apart
    from ``correction_reach`` (the box sessions' rule): strict here, a background click changes only its
    neighbourhood of a lone-click session's previous answer."""
    img, aff = volume
    plain = _engine(config=EngineConfig(max_zoom=0, boundary_cut=None, correction_reach=()))
    strict = _engine(config=EngineConfig(max_zoom=0, boundary_cut=None, correction_reach=(),
                                         lone_correction_reach=(1.0, 1.0, "asym")))
    prev = np.zeros(img.shape, np.uint8)
    prev[18:42, 18:47, 8:22] = 1
    click = dict(points=[[21, 30, 15]], point_labels=[0], prev_mask=prev)  # 3 voxels inside prev's boundary
    free, held = plain.segment(img, aff, **click), strict.segment(img, aff, **click)
    far = np.ones(img.shape, bool)
    far[14:29, 22:39, 7:24] = False  # beyond the click's reach (1 x 3 mm + 1 mm, anisotropic voxels)
    assert np.array_equal(held[far], prev[far])  # the previous answer stands away from the click
    assert not np.array_equal(free[far], prev[far])  # where the network alone changed it
    box = [[20, 39, 20, 44, 10, 19]]  # with a box the box sessions' rule (off here) applies, not this one
    assert np.array_equal(plain.segment(img, aff, boxes=box, **click), strict.segment(img, aff, boxes=box, **click))
