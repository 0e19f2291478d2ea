"""Prompt simulation (lib.prompts.simulation) on synthetic shapes whose answer is known."""

import time

import numpy as np
import pytest

from lib.prompts import box_from_mask, mask_bbox, next_click


def _cube(shape, lo, hi):
    m = np.zeros(shape, dtype=np.uint8)
    m[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = 1
    return m


def test_mask_bbox_and_empty():
    m = _cube((10, 12, 14), (2, 3, 4), (5, 7, 9))
    assert mask_bbox(m).tolist() == [2, 5, 3, 7, 4, 9]
    assert mask_bbox(np.zeros((4, 4, 4))) is None


def test_box_no_jitter_is_exact_bbox():
    m = _cube((20, 20, 20), (3, 4, 5), (10, 11, 12))
    assert box_from_mask(m, jitter=0, rng=0).tolist() == [3, 10, 4, 11, 5, 12]


def test_box_jitter_bounds_outward_only_and_clipped():
    m = _cube((30, 30, 30), (10, 10, 1), (15, 18, 28))
    bbox = np.array([10, 15, 10, 18, 1, 28])
    rng = np.random.default_rng(123)
    seen = set()
    for _ in range(300):
        b = box_from_mask(m, jitter=3, rng=rng)
        assert b.dtype == np.int64 and b.shape == (6,)
        lo, hi = b[0::2], b[1::2]
        assert np.all(lo <= bbox[0::2]) and np.all(hi >= bbox[1::2])  # never inward
        assert np.all(bbox[0::2] - lo <= 3) and np.all(hi - bbox[1::2] <= 3)  # at most jitter
        assert np.all(lo >= 0) and np.all(hi <= 29)  # clipped to the image
        seen.add(int(bbox[0] - lo[0]))
    assert seen == {0, 1, 2, 3}  # all offsets 0..jitter occur


def test_box_deterministic_and_errors():
    m = _cube((20, 20, 20), (5, 5, 5), (9, 9, 9))
    a = box_from_mask(m, 3, np.random.default_rng(7))
    b = box_from_mask(m, 3, np.random.default_rng(7))
    assert a.tolist() == b.tolist()
    with pytest.raises(ValueError):
        box_from_mask(np.zeros((5, 5, 5)), 3, 0)
    with pytest.raises(ValueError):
        box_from_mask(m, -1, 0)


def test_missing_cube_click_at_centre_foreground():
    gt = _cube((40, 40, 40), (10, 12, 14), (20, 22, 24))  # 11^3 cube, centre (15, 17, 19)
    out = next_click(np.zeros_like(gt), gt, rng=0)
    assert out is not None
    pt, fg = out
    assert pt.tolist() == [15, 17, 19] and fg is True
    assert pt.dtype == np.int64
    # pred=None means "no prediction yet"
    assert next_click(None, gt, rng=0)[0].tolist() == [15, 17, 19]


def test_false_positive_gives_background_click():
    gt = _cube((40, 40, 40), (2, 2, 2), (6, 6, 6))
    pred = gt.copy()
    pred[20:29, 20:29, 20:29] = 1  # false positive cube, 9^3, centre (24, 24, 24)
    pt, fg = next_click(pred, gt, rng=0)
    assert pt.tolist() == [24, 24, 24] and fg is False


def test_largest_component_wins_and_26_connectivity():
    gt = np.zeros((50, 50, 50), np.uint8)
    gt[5:10, 5:10, 5:10] = 1  # 5^3 small error
    gt[20:35, 20:35, 20:35] = 1  # 15^3 big error, centre (27, 27, 27)
    pt, fg = next_click(np.zeros_like(gt), gt, rng=1)
    assert pt.tolist() == [27, 27, 27] and fg
    # Three 3^3 cubes touching only at corners form one 26-connected component of 81 voxels, larger than a
    # separate 4^3 cube (64 voxels); under 6-connectivity each would be 27 voxels and the 4^3 cube would win.
    e = np.zeros((40, 40, 40), np.uint8)
    e[30:34, 30:34, 30:34] = 1  # 64 voxels
    for s in (0, 3, 6):
        e[2 + s:5 + s, 2 + s:5 + s, 2 + s:5 + s] = 1  # chain of 3^3 cubes touching at corners = 81 voxels
    pt, _ = next_click(np.zeros_like(e), e, rng=0)
    assert 2 <= pt[0] <= 10  # the diagonal chain is one component under 26-connectivity


def test_border_counts_as_outside():
    # Missing slab touching the image border: with the border treated as outside, the deepest voxel is in
    # the middle of the slab's thickness, not on the border face.
    gt = np.zeros((30, 30, 30), np.uint8)
    gt[0:7, :, :] = 1  # slab of thickness 7 on the i=0 face, full in j and k
    pt, fg = next_click(np.zeros_like(gt), gt, rng=0)
    assert pt[0] == 3 and fg
    # Whole image wrong: centre of the volume
    gt = np.ones((9, 9, 9), np.uint8)
    assert next_click(np.zeros_like(gt), gt, rng=0)[0].tolist() == [4, 4, 4]


def test_ties_deterministic_with_seed_and_random_across_seeds():
    gt = np.zeros((10, 40, 10), np.uint8)
    gt[2:7, 2:38, 2:7] = 1  # 5 x 36 x 5 bar: every voxel on the central line (i=4, k=4) is at depth 3
    picks = {tuple(next_click(np.zeros_like(gt), gt, rng=s)[0].tolist()) for s in range(20)}
    for p in picks:
        assert p[0] == 4 and p[2] == 4 and 4 <= p[1] <= 35
    assert len(picks) > 1  # ties broken at random
    a = next_click(np.zeros_like(gt), gt, rng=np.random.default_rng(5))
    b = next_click(np.zeros_like(gt), gt, rng=np.random.default_rng(5))
    assert a[0].tolist() == b[0].tolist()


def test_no_error_returns_none_and_shape_mismatch():
    gt = _cube((10, 10, 10), (2, 2, 2), (5, 5, 5))
    assert next_click(gt.copy(), gt, rng=0) is None
    assert next_click(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), rng=0) is None
    with pytest.raises(ValueError):
        next_click(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def test_fast_on_64_cubed():
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:64, :64, :64]
    gt = ((zz - 32) ** 2 + (yy - 30) ** 2 + (xx - 34) ** 2 < 20 ** 2).astype(np.uint8)
    pred = np.roll(gt, 5, axis=0)
    next_click(pred, gt, rng)  # warm-up
    t = time.perf_counter()
    for _ in range(10):
        out = next_click(pred, gt, rng)
    dt = (time.perf_counter() - t) / 10
    assert out is not None
    assert dt < 0.25, f"next_click took {dt:.3f} s on 64^3"  # ~0.012 s unloaded; slack for busy CI machines


def test_large_volume_correct():
    gt = np.zeros((512, 512, 300), np.uint8)
    gt[100:141, 200:261, 50:91] = 1  # 41 x 61 x 41 box, centre (120, 230, 70); depth 21 along i and k
    pred = np.zeros_like(gt)
    pred[300:310, 300:310, 200:210] = 1  # small false positive elsewhere
    pt, fg = next_click(pred, gt, rng=0)
    assert pt[0] == 120 and pt[2] == 70 and 220 <= pt[1] <= 240 and fg
