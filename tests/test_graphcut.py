"""lib.graphcut.BoundaryCut: the engine's native-resolution boundary cut after the network (synthetic volumes with a
known object; the engine wiring with a tiny network)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from lib.engine import EngineConfig, EnsamEngine
from lib.evaluation.metrics import dice
from lib.graphcut import BoundaryCut, balls
from lib.network import NetworkConfig, build_network

SPACING = np.array([1.0, 1.0, 1.0])


def _ball(shape, centre, radius):
    return balls(shape, [centre], radius, SPACING)


@pytest.fixture(scope="module")
def scene():
    """A bright ball (radius 10) in noise correlated over about a voxel (as in a reconstructed scan), in a 60^3
    volume of 1 mm voxels."""
    rng = np.random.default_rng(0)
    truth = _ball((60, 60, 60), (30, 30, 30), 10)
    noise = ndimage.gaussian_filter(rng.normal(0, 45, truth.shape), 1.0)
    img = (noise + 200 * truth).astype(np.int16)
    return img, truth


def test_boundary_snaps_to_the_image(scene):
    """A mask 3 voxels too large and off-centre (a coarse model grid's answer) is cut back to the ball."""
    img, truth = scene
    rough = _ball(truth.shape, (31, 30, 29), 13)
    out = BoundaryCut().refine(img, rough, SPACING)
    assert out.dtype == bool and out.shape == truth.shape
    assert dice(rough, truth) < 0.65
    assert dice(out, truth) > 0.95


def test_the_cut_grows_a_partial_answer_along_the_image_and_never_drops_it(scene):
    """The network found a third of the ball: the cut grows it along the image, and a foreground click deep in
    the missed part completes it. Found only a cap, the intensity model learns "bright = background" from the
    missed rest; the cut would drop everything: the network's answer is kept instead (and the click added)."""
    img, truth = scene
    cut = BoundaryCut()
    third = truth.copy()
    third[27:] = False
    alone = cut.refine(img, third, SPACING)
    clicked = cut.refine(img, third, SPACING, points=[[36, 30, 30]], point_labels=[1])
    assert dice(third, truth) < 0.45 and dice(alone, truth) > dice(third, truth) + 0.3
    assert clicked[36, 30, 30] and dice(clicked, truth) > 0.97
    cap = truth.copy()
    cap[24:] = False
    out = cut.refine(img, cap, SPACING, points=[[36, 30, 30]], point_labels=[1])
    assert out[cap].all() and out[36, 30, 30]


def test_the_cut_works_inside_the_box_and_clicks_are_imposed(scene):
    """With a box the cut changes nothing beyond the box grown by one voxel (background seeds there), snaps the
    boundary inside it, and the clicked voxels keep their labels."""
    img, truth = scene
    rough = _ball(truth.shape, (30, 30, 30), 13)
    box = [18, 42, 18, 42, 18, 30]  # cuts the ball at k = 30
    out = BoundaryCut().refine(img, rough, SPACING, points=[[30, 30, 28], [31, 30, 29]], point_labels=[1, 0],
                               box=box)
    assert np.array_equal(out[:, :, 32:], rough[:, :, 32:])
    assert out[30, 30, 28] and not out[31, 30, 29]
    assert dice(out[:, :, :31], truth[:, :, :31]) > 0.95 > 0.7 > dice(rough[:, :, :31], truth[:, :, :31])


def test_a_large_crop_is_cut_on_a_coarser_grid(scene):
    """Over ``max_voxels`` the cut runs on integer-coarsened blocks (finest axes first); where it agrees with the
    mask's block majority the fine mask is kept, so the answer stays close to the full-resolution cut."""
    img, truth = scene
    rough = _ball(truth.shape, (31, 30, 29), 13)
    full = BoundaryCut().refine(img, rough, SPACING)
    n = int(np.prod([s.stop - s.start for s in BoundaryCut().crop(rough, SPACING, [])]))  # 47^3
    small = BoundaryCut(max_voxels=n // 3)
    f = small.factors((47, 47, 47), SPACING)
    assert np.prod(np.ceil(47 / f)) <= n // 3 and sorted(f.tolist()) == [1, 2, 2]
    assert BoundaryCut(max_voxels=5000).factors((40, 40, 10), [1.0, 1.0, 4.0]).tolist() == [2, 2, 1]  # the coarse axis is kept
    assert BoundaryCut().factors((47, 47, 47), SPACING).tolist() == [1, 1, 1]
    coarse = small.refine(img, rough, SPACING)
    assert dice(full, truth) > 0.95
    assert dice(coarse, truth) > 0.9 and dice(coarse, full) > 0.9
    assert dice(coarse, truth) > dice(rough, truth) + 0.2


def test_empty_mask_and_no_prompt_change_nothing(scene):
    img, _ = scene
    empty = np.zeros(img.shape, bool)
    assert not BoundaryCut().refine(img, empty, SPACING).any()


def test_engine_runs_the_cut_after_the_network():
    """EngineConfig(boundary_cut=...) (a dict as in JSON) runs the cut on the network's answer: the all-foreground
    network fills its ROI; inside the box the cut keeps the bright object and sheds dark background (seeded by the
    box's faces and the background click); beyond the box grown by one voxel the answer is the network's; the
    time is reported."""
    cfg = NetworkConfig(filters=4, blocks=(1, 1, 1), heads=2, depth=1, roi_size=(24, 24, 24), num_labels=8)
    rng = np.random.default_rng(0)
    img = rng.normal(0, 20, (70, 60, 30)).astype(np.int16)
    img[20:40, 20:45, 10:20] += 300
    aff = np.diag([0.9, 0.9, 2.5, 1.0])
    engines = {}
    for name, bc in (("plain", None), ("cut", {"max_voxels": 10 ** 6})):
        torch.manual_seed(0)
        eng = EnsamEngine(network=build_network(cfg), config=EngineConfig(max_zoom=0, boundary_cut=bc))
        torch.nn.init.constant_(eng.network.decoder.bias.bias, 100.0)  # all foreground
        torch.nn.init.zeros_(eng.network.decoder.bias.weight)
        eng.set_network(eng.network)
        engines[name] = eng
    assert isinstance(engines["cut"].config.boundary_cut, BoundaryCut)
    box = [[15, 44, 15, 49, 8, 21]]
    plain = engines["plain"].segment(img, aff, boxes=box, points=[[30, 30, 15]], point_labels=[0])
    cut = engines["cut"].segment(img, aff, boxes=box, points=[[30, 30, 15]], point_labels=[0])
    inner = (slice(14, 46), slice(14, 51), slice(7, 23))  # the box grown by one voxel
    outside = np.ones(img.shape, bool)
    outside[inner] = False
    assert np.array_equal(cut[outside], plain[outside])
    assert plain[inner].all()
    assert cut[30, 30, 15] == 0 and cut[31, 31, 15] == 0 and cut[30, 30, 16] == 0  # the 3 mm seed ball
    obj = np.zeros(img.shape, bool)
    obj[20:40, 20:45, 10:20] = True
    assert cut[obj].mean() > 0.95
    assert cut[inner][~obj[inner]].mean() < 0.8
    assert "cut_s" in engines["cut"].last_info and "cut_s" not in engines["plain"].last_info
