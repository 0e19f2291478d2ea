"""Prompt geometry: a click on a voxel lands on that voxel, through ROI choice, crop, resize and back, for
anisotropic, flipped and oblique affines (the image is used as stored; only spacing matters)."""

import numpy as np
import pytest
import torch

from lib.geometry import (PromptError, Roi, RoiPolicy, check_prompts, choose_roi, crop_to_model, logits_to_original,
                          mask_to_model, spacing_from_affine)


def _oblique_affine(spacing, flip=(1, -1, 1), angle=0.3):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(flip)
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = [-100, 50, 20]
    return a


AFFINES = [np.diag([1.0, 1.0, 1.0, 1.0]), np.diag([-0.7, 0.7, 3.0, 1.0]), _oblique_affine([0.9, 1.2, 2.5]),
           _oblique_affine([2.0, 0.5, 5.0], flip=(-1, -1, -1), angle=1.1)]


@pytest.mark.parametrize("affine", AFFINES)
def test_spacing_from_any_affine(affine):
    expected = np.abs(np.linalg.svd(affine[:3, :3])[1])  # rotation does not change column norms
    assert np.allclose(sorted(spacing_from_affine(affine)), sorted(expected))


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("seed", range(4))
def test_click_round_trip_lands_on_its_voxel(affine, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(x) for x in rng.integers(20, 90, 3))
    v = np.array([rng.integers(0, s) for s in shape])
    roi = choose_roi(shape, spacing_from_affine(affine), fg_points=v[None], policy=RoiPolicy(model_shape=(32, 24, 40)))
    m = roi.to_model(v[None])[0]
    assert np.allclose((m + 0.5) / roi.scale - 0.5 + np.asarray(roi.start), v)  # the inverse map lands on v
    # the model predicts a small blob at the click; pasted back it covers the clicked voxel
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in roi.model_shape], indexing="ij"), -1)
    logits = torch.from_numpy(1.5 - np.linalg.norm(grid - m, axis=-1)).float()
    mask = logits_to_original(logits, roi, shape)
    assert mask.shape == shape and mask[tuple(v)] == 1


@pytest.mark.parametrize("affine", AFFINES)
def test_bright_voxel_is_found_at_its_model_coordinate(affine):
    shape = (60, 50, 30)
    img = np.zeros(shape, np.float32)
    v = np.array([37, 12, 20])
    img[tuple(v)] = 1000
    box = check_prompts(None, None, [[45, 30, 5, 20, 25, 15]], shape).box_array  # reversed pairs are sorted
    assert box.tolist() == [[30, 45, 5, 20, 15, 25]]
    roi = choose_roi(shape, spacing_from_affine(affine), boxes=box)
    x = crop_to_model(img, roi)[0].numpy()
    peak = np.array(np.unravel_index(np.argmax(x), x.shape))
    assert np.all(np.abs(peak - roi.to_model(v[None])[0]) <= 1.0)


def test_mask_round_trip_through_model_grid():
    shape = (40, 70, 25)
    mask = np.zeros(shape, np.uint8)
    mask[10:30, 20:50, 5:20] = 1
    roi = Roi((-5, 10, 0), (50, 60, 30), (32, 32, 32))
    soft = mask_to_model(mask, roi)[0]
    back = logits_to_original(soft - 0.5, roi, shape)
    dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
    assert dice > 0.95
    assert back[:, :10].sum() == 0  # nothing written outside the ROI


def test_roi_contains_prompts_with_margin_and_respects_aspect():
    shape, spacing = (512, 512, 20), np.array([0.8, 0.8, 2.0])
    box = check_prompts(None, None, [[100, 150, 200, 300, 5, 10]], shape).box_array
    roi = choose_roi(shape, spacing, boxes=box, policy=RoiPolicy(margin=0.25, max_aspect=2.0))
    assert roi.contains(box[0, 0::2], box[0, 1::2])
    mm = np.asarray(roi.size) * spacing
    assert mm.max() / mm.min() <= 2.0 + 1e-6
    assert mm[1] >= 101 * 0.8 * 1.5 - 1


def test_bad_prompts_are_clear_errors():
    with pytest.raises(PromptError, match="outside the image"):
        check_prompts([[10, 10, 99]], [1], None, (20, 20, 20))
    with pytest.raises(PromptError, match=r"\[i0, i1, j0, j1, k0, k1\]"):
        check_prompts(None, None, [[1, 2, 3, 4]], (20, 20, 20)).box_array
    with pytest.raises(PromptError, match="outside the image"):
        check_prompts(None, None, [[30, 40, 1, 2, 1, 2]], (20, 20, 20)).box_array
    with pytest.raises(PromptError, match="no prompt"):
        choose_roi((20, 20, 20), (1, 1, 1))
    assert check_prompts(None, None, [[-5, 25, 1, 2, 3, 4]], (20, 20, 20)).box_array.tolist() == [[0, 19, 1, 2, 3, 4]]


@pytest.mark.parametrize("size,model", [((50, 37, 21), (16, 24, 32)), ((9, 40, 64), (32, 32, 32))])
def test_resampling_matches_monai_resize(size, model):
    """Our read-only-what-is-needed resampling equals MONAI's Resize (trilinear, no anti-aliasing) when the ROI
    is the whole image (inside a larger image it reads real neighbours instead of replicating the crop's edge),
    and upsampling logits back equals F.interpolate."""
    from monai.transforms import Resize
    import torch.nn.functional as F
    from lib.geometry import _resample, _to_model_taps

    rng = np.random.default_rng(0)
    crop = rng.normal(size=size).astype(np.float32)
    ref = Resize(model, mode="trilinear", anti_aliasing=False)(torch.from_numpy(crop)[None])[0]
    ours = _resample(crop, _to_model_taps(Roi((0, 0, 0), size, model), size))
    assert torch.allclose(torch.as_tensor(ref), ours, atol=1e-5)
    img = rng.normal(size=(70, 60, 80)).astype(np.float32)
    roi = Roi((5, 3, 2), size, model)
    logits = torch.randn(*model)
    up = F.interpolate(logits[None, None], size=size, mode="trilinear", align_corners=False)[0, 0] > 0
    back = logits_to_original(logits, roi, img.shape)
    assert np.array_equal(back[5:5 + size[0], 3:3 + size[1], 2:2 + size[2]], up.numpy().astype(np.uint8))
    assert back.sum() == up.sum()


def test_default_roi_keeps_a_slab_organ_mostly_inside_the_scan():
    """A liver-sized box spanning a 20-slice (40 mm) slab: the default policy's ROI keeps at least half of its
    depth inside the scan (20 of 34 slices; the aspect-2 policy the weights trained with keeps 20 of 68, and the
    model lost the organ); in-plane it still covers the box with the margin."""
    shape, spacing = (512, 512, 20), (0.98, 0.98, 2.0)
    box = np.array([[104, 281, 190, 374, 0, 19]])

    width = box[0, 1] - box[0, 0] + 1  # 178 voxels along the first axis

    def inside_fraction(policy):
        roi = choose_roi(shape, spacing, boxes=box, policy=policy)
        z0, nz = roi.start[2], roi.size[2]
        assert roi.size[0] >= 1.5 * width - 1  # in-plane margin kept
        return (min(z0 + nz, shape[2]) - max(z0, 0)) / nz

    assert inside_fraction(RoiPolicy()) >= 0.5
    assert inside_fraction(RoiPolicy(max_aspect=2.0)) < 0.35


def test_finer_window_is_finer_but_never_below_a_voxel_and_centred():
    roi = Roi((10, 20, 30), (256, 128, 64), (64, 64, 64))  # 4, 2, 1 original voxels per model voxel
    w = roi.finer_window((100, 80, 60), 2.0)
    assert w.model_shape == roi.model_shape and w.size == (128, 64, 64)  # 2, 1, 1 (never below 1) per model voxel
    np.testing.assert_allclose(roi.finer_voxels(2.0), [2.0, 1.0, 1.0])
    centre = np.asarray(w.start) + (np.asarray(w.size) - 1) / 2
    assert np.all(np.abs(centre - [100, 80, 60]) <= 0.5)
    local = w.shifted((10, 20, 30))
    assert local.size == w.size and np.array_equal(np.asarray(local.start) + [10, 20, 30], w.start)


def test_intensity_normalisation_equals_monai_percentile_scaling_on_the_model_grid():
    """geometry.normalize_intensity (the contract's ``percentile_0.5_99.5``) is MONAI's percentile scaling on the
    default 64^3 grid; only a nearly constant image differs (MONAI: ``x - lo``; ours: min..max -> 0..1)."""
    from monai.transforms import ScaleIntensityRangePercentiles

    from lib.geometry import normalize_intensity

    monai = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    g = torch.Generator().manual_seed(3)
    for x in ((torch.randn((1, 64, 64, 64), generator=g) * 300 + 40),
              torch.rand((1, 64, 64, 64), generator=g) ** 4 * 2000 - 1000):
        ours = normalize_intensity(x)
        np.testing.assert_allclose(ours.numpy(), torch.as_tensor(monai(x)).float().numpy(), atol=1e-6)
        assert type(ours) is torch.Tensor and ours.dtype == torch.float32
    nearly_constant = torch.full((1, 64, 64, 64), 5.0)
    nearly_constant[0, 0, 0, 0] = 100.0
    y = normalize_intensity(nearly_constant)
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0


def test_flipped_prompts_draw_the_flipped_prompt_maps():
    """Test-time flips (EngineConfig.tta_flips): prompts moved by flip_model_points / flip_model_boxes draw, on the
    model grid, exactly the mirror image of the maps the original prompts draw (boxes stay lo <= hi)."""
    from lib.geometry import flip_model_boxes, flip_model_points
    from lib.network import BG, BOX_MAX, BOX_MIN, FG, dense_prompt_maps

    shape = (20, 16, 12)
    pts = np.array([[3.0, 4.0, 5.0], [15.2, 2.0, 9.0]])
    box = np.array([[2.0, 9.0, 5.0, 12.0, 1.0, 6.0]])
    prev = torch.zeros(1, 1, *shape)
    prev[0, 0, 4:8, 6:11, 2:4] = 1

    def maps(p, b, pm):
        corners = np.stack([b[:, 0::2], b[:, 1::2]], axis=1).reshape(-1, 3)
        allp = torch.as_tensor(np.concatenate([p, corners]), dtype=torch.float32)[None]
        types = torch.as_tensor([FG, BG, BOX_MIN, BOX_MAX])[None]
        return dense_prompt_maps(allp, types, shape, pm)[0]

    ref = maps(pts, box, prev)
    for axes in [(0,), (1,), (2,), (0, 2), (0, 1, 2)]:
        fb = flip_model_boxes(box, shape, axes)
        assert np.all(fb[:, 0::2] <= fb[:, 1::2])
        got = maps(flip_model_points(pts, shape, axes), fb, torch.flip(prev, [2 + d for d in axes]))
        assert torch.allclose(got, torch.flip(ref, [1 + d for d in axes]), atol=1e-5), axes
        assert np.allclose(flip_model_points(flip_model_points(pts, shape, axes), shape, axes), pts)
