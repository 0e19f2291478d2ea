"""lib.click_scale.LoneClickView: the view around a lone click sized from the image (synthetic scans with objects
of known size), and its use by the engine for a first click without a box."""

import numpy as np
import torch
from scipy import ndimage

from lib.click_scale import LoneClickView
from lib.engine import EngineConfig, EnsamEngine
from lib.graphcut import balls
from lib.network import NetworkConfig, build_network


def _scene(spacing=(1.0, 1.0, 2.0)):
    """A large organ (radius 40 mm) and a small nodule (radius 5 mm) of different intensities in textured
    background (noise correlated over ~2 mm), on an anisotropic grid."""
    spacing = np.asarray(spacing)
    shape = (200, 200, 80)
    rng = np.random.default_rng(0)
    big = balls(shape, [(70, 100, 40)], 40.0, spacing)
    small = balls(shape, [(160, 100, 40)], 5.0, spacing)
    img = ndimage.gaussian_filter(rng.normal(0, 60, shape), 1.0) + 100 * big + 250 * small
    return img.astype(np.int16), spacing


def test_the_view_follows_the_object_under_the_click():
    img, spacing = _scene()
    lv = LoneClickView()
    r_big = lv.radius_mm(img, spacing, (70, 100, 40))
    r_small = lv.radius_mm(img, spacing, (160, 100, 40))
    assert 24 <= r_big <= 64, r_big  # the organ's radius is 40 mm
    assert r_small <= 11, r_small  # the nodule's is 5 mm
    assert lv.view_mm(img, spacing, (70, 100, 40)) > 2 * lv.view_mm(img, spacing, (160, 100, 40))
    # bounded both ways
    assert lv.view_mm(img, spacing, (160, 100, 40)) >= lv.min_mm
    assert LoneClickView(max_mm=100.0).view_mm(img, spacing, (70, 100, 40)) == 100.0
    # a click at the image's corner is answered (shells mostly outside the image bound the view)
    assert lv.min_mm <= lv.view_mm(img, spacing, (0, 0, 0)) <= lv.max_mm


def test_the_engine_sizes_a_lone_click_view_only_without_box_or_previous_mask():
    img, spacing = _scene()
    aff = np.diag([*spacing, 1.0])
    cfg = NetworkConfig(filters=4, blocks=(1, 1, 1), heads=2, depth=1, roi_size=(24, 24, 24), num_labels=8)
    torch.manual_seed(0)
    net = build_network(cfg)
    fixed = EnsamEngine(network=net, config=EngineConfig(max_zoom=0, boundary_cut=None))
    sized = EnsamEngine(network=net, config=EngineConfig(max_zoom=0, boundary_cut=None,
                                                         lone_click_view={"k": 5.0}))
    assert isinstance(sized.config.lone_click_view, LoneClickView)
    edge = lambda eng: np.asarray(eng.last_info["roi_size"]) * spacing  # noqa: E731
    fixed.segment(img, aff, points=[[70, 100, 40]], point_labels=[1])
    sized.segment(img, aff, points=[[70, 100, 40]], point_labels=[1])
    expected = sized.config.lone_click_view.view_mm(img, spacing, (70, 100, 40))
    assert expected > 64
    assert edge(fixed).max() < 70 and abs(edge(sized).max() - expected) <= spacing.max()
    sized.segment(img, aff, points=[[160, 100, 40]], point_labels=[1])
    assert edge(sized).max() < edge(fixed).max() + spacing.max()
    # with a box, or a previous mask, the prompts bound the ROI: the same as without the rule
    box = [[50, 90, 80, 120, 30, 50]]
    for eng in (fixed, sized):
        eng.segment(img, aff, boxes=box)
    assert np.array_equal(fixed.last_info["roi_size"], sized.last_info["roi_size"])
    prev = np.zeros(img.shape, np.uint8)
    prev[60:80, 90:110, 35:45] = 1
    for eng in (fixed, sized):
        eng.segment(img, aff, points=[[70, 100, 40]], point_labels=[1], prev_mask=prev)
    assert np.array_equal(fixed.last_info["roi_size"], sized.last_info["roi_size"])


def test_the_network_sizes_a_lone_click_view_with_a_probe():
    """EngineConfig.lone_click_probe: a pass in a probe view; the answer's largest extent x scale is the next view
    (within the contract's minimum ROI edge and the previous view), `rounds` times; nothing answered = the
    contract's view; a box or a previous mask bound the ROI as without it. The answer is steered by the threshold
    (everything / nothing) so that the expected views are known whatever the untrained network says."""
    img, spacing = _scene()
    aff = np.diag([*spacing, 1.0])
    cfg = NetworkConfig(filters=4, blocks=(1, 1, 1), heads=2, depth=1, roi_size=(24, 24, 24), num_labels=8)
    torch.manual_seed(0)
    net = build_network(cfg)
    edge = lambda eng: (np.asarray(eng.last_info["roi_size"]) * spacing).max()  # noqa: E731
    click = dict(points=[[100, 100, 40]], point_labels=[1])

    def engine(threshold, probe=()):
        return EnsamEngine(network=net, config=EngineConfig(max_zoom=0, boundary_cut=None, threshold=threshold,
                                                             lone_click_probe=probe))

    fixed = engine(-1e9)
    fixed.segment(img, aff, **click)
    assert abs(edge(fixed) - 64) <= 2 * spacing.max()
    # the answer fills the probe: its extent is the 150 mm probe; x 0.5, then again each round, down to the 32 mm floor
    for rounds, want in ((1, 75.0), (2, 37.5), (3, 32.0)):
        eng = engine(-1e9, (150.0, 0.5, rounds))
        eng.segment(img, aff, **click)
        assert abs(edge(eng) - want) <= 2 * spacing.max(), (rounds, edge(eng))
    # x 2 would grow past the probe: the view stays the probe's
    eng = engine(-1e9, (150.0, 2.0))
    eng.segment(img, aff, **click)
    assert abs(edge(eng) - 150) <= 2 * spacing.max()
    # nothing answered: the contract's view
    eng = engine(1e9, (150.0, 0.5))
    eng.segment(img, aff, **click)
    assert abs(edge(eng) - 64) <= 2 * spacing.max()
    # a box, a previous mask: as without the probe
    prev = np.zeros(img.shape, np.uint8)
    prev[90:110, 90:110, 35:45] = 1
    for kw in (dict(boxes=[[50, 90, 80, 120, 30, 50]]), dict(prev_mask=prev, **click)):
        a, b = engine(-1e9), engine(-1e9, (150.0, 0.5, 3))
        a.segment(img, aff, **kw)
        b.segment(img, aff, **kw)
        assert np.array_equal(a.last_info["roi_size"], b.last_info["roi_size"])
