"""Scribbles without a server (issue 12): stroke volumes -> prompts (lib.prompts.strokes), the simulated stroke
(lib.prompts.simulation.next_stroke), the evaluator's strokes protocol and the training loop's stroke option."""

import numpy as np
import pytest
import torch

from lib.evaluation.evaluator import evaluate_structure, run_name
from lib.prompts.simulation import next_click, next_stroke
from lib.prompts.strokes import (StrokeError, decode_strokes, prompts_from_masks, stroke_points, stroke_values,
                                 strokes_to_prompts)
from lib.training.loop import LoopConfig, _correction, unrolled_loss

torch.set_num_threads(1)
SLICER_INFO = [{"name": "liver", "id": 1}, {"name": "spleen", "id": 2}, {"name": "background_scribbles", "id": 3},
               {"name": "foreground_scribbles", "id": 4}]


def _box(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
    return m


# ------------------------------------------------------------------------------------------------ stroke volumes
def test_stroke_values_follow_label_info_like_monailabel():
    assert stroke_values(None)[:2] == (3, 2)  # monailabel's defaults: foreground 3, background 2
    fg, bg, names = stroke_values(SLICER_INFO)  # two segments before the strokes: Slicer numbers them 1..4
    assert (fg, bg) == (4, 3) and names[1] == "liver" and names[2] == "spleen"
    with pytest.raises(StrokeError, match="same value"):
        stroke_values([{"name": "foreground_scribbles", "id": 2}])
    with pytest.raises(StrokeError, match="label_info"):
        stroke_values([{"id": 2}])
    with pytest.raises(StrokeError, match="integer"):
        stroke_values([{"name": "x", "id": 1.5}])


def test_decode_strokes_and_unknown_values():
    v = np.zeros((10, 10, 4), np.uint8)
    v[2, 2:8, 1] = 3
    v[7, 2:8, 2] = 2
    v[4:6, 4:6, 0] = 1  # the edited segment, exported with the strokes
    fg, bg = decode_strokes(v)
    assert fg.sum() == 6 and bg.sum() == 6 and not (fg & bg).any()
    v[0, 0, 0] = 7
    with pytest.raises(StrokeError, match=r"unknown value\(s\) 7"):
        decode_strokes(v)
    f = np.zeros((10, 10, 4), np.float32)
    f[1, 1, 1] = 2.5
    with pytest.raises(StrokeError, match="2.5"):
        decode_strokes(f)
    with pytest.raises(StrokeError, match="3D"):
        decode_strokes(np.zeros((4, 4)))


def test_points_lie_on_the_strokes_centre_line_and_spread_along_them():
    s = np.zeros((60, 30, 12), bool)
    s[5:55, 12:17, 6] = True  # a 5-voxel-wide brush stroke in one slice, 50 voxels long
    pts = stroke_points(s, spacing=(1.0, 1.0, 1.0), step_mm=5.0)
    assert np.all(s[tuple(pts.T)]) and np.all(np.abs(pts[:, 1] - 14) <= 1)  # on the stroke, near its centre line
    gaps = np.diff(np.sort(pts[:, 0]))
    assert pts[:, 0].min() <= 8 and pts[:, 0].max() >= 51  # from one end to the other
    assert gaps.max() <= 5 and len(pts) <= 20
    few = stroke_points(s, step_mm=1.0, max_points=4)
    assert len(few) == 4 and np.ptp(few[:, 0]) >= 40  # a small budget still spans the stroke
    # the step is in millimetres: a longer step, or the same stroke at 0.5 mm voxels, needs fewer points
    assert len(stroke_points(s, step_mm=10.0)) < len(pts)
    assert len(stroke_points(s, spacing=(0.5, 1.0, 1.0), step_mm=5.0)) < len(pts)
    assert stroke_points(np.zeros_like(s)).shape == (0, 3)


def test_every_separate_stroke_gets_points_and_thick_strokes_are_thinned():
    s = np.zeros((40, 40, 40), bool)
    s[5:9, 5:9, 5:35] = True  # an even-width 3D tube (Lee's thinning deletes it: all its voxels stay candidates)
    s[30, 30, 30] = True  # a dot far away
    pts = stroke_points(s, step_mm=6.0, max_points=20)
    assert np.all(s[tuple(pts.T)]) and [30, 30, 30] in pts.tolist()
    assert np.ptp(pts[:, 2]) >= 25


def test_strokes_to_prompts_as_slicer_exports_them():
    v = np.zeros((32, 32, 8), np.uint8)
    v[8:24, 8:24, :] = 1  # liver
    v[12:20, 16, 4] = 4  # a foreground stroke inside it (later segments win in Slicer's export)
    v[2, 4:28, 4] = 3  # a background stroke
    p = strokes_to_prompts(v, (0.8, 0.8, 3.0), SLICER_INFO)
    assert p.n_fg >= 1 and p.n_bg >= 2 and p.fg_voxels == 8 and p.bg_voxels == 24
    assert np.all(p.point_labels[:p.n_fg] == 1) and np.all(p.point_labels[p.n_fg:] == 0)
    assert np.all(v[tuple(p.points[p.point_labels == 1].T)] == 4)
    assert np.all(v[tuple(p.points[p.point_labels == 0].T)] == 3)


# ------------------------------------------------------------------------------------------------ simulated strokes
def test_next_stroke_runs_along_the_missed_region_in_one_slice():
    gt = _box((40, 40, 20), (5, 10, 5), (34, 19, 14))
    pred = gt.copy()
    pred[5:35, 10:20, 5:10] = False  # a missed 30 x 10 x 5 slab
    voxels, fg = next_stroke(pred, gt, rng=0)
    assert fg is True and np.all(gt[tuple(voxels.T)] & ~pred[tuple(voxels.T)])
    assert np.any(np.ptp(voxels, axis=0) == 0)  # painted in one slice
    assert np.ptp(voxels[:, 0]) >= 20  # along the long side of the error, not a point
    steps = np.abs(np.diff(voxels, axis=0)).max(axis=1)
    assert np.all(steps == 1)  # a connected line, in order
    # its kind and its error component are the click's (same rule, same deepest voxel)
    click, click_fg = next_click(pred, gt, rng=0)
    assert click_fg is fg and min(np.abs(voxels - click).sum(1)) <= 6


def test_next_stroke_background_and_agreement():
    gt = _box((30, 30, 30), (10, 10, 10), (19, 19, 19))
    pred = gt | _box(gt.shape, (0, 0, 0), (2, 2, 2))
    voxels, fg = next_stroke(pred, gt, rng=1)
    assert fg is False and np.all(pred[tuple(voxels.T)] & ~gt[tuple(voxels.T)])
    assert next_stroke(gt, gt) is None
    one = gt.copy()
    one[15, 15, 15] = False
    assert next_stroke(one, gt)[0].tolist() == [[15, 15, 15]]


# ------------------------------------------------------------------------------------------------ evaluator
class Painter:
    """Predicts the ground truth restricted to the union of balls around the given foreground points."""

    name = "painter"

    def __init__(self, gt):
        self.gt = gt
        self.calls = []

    def predict(self, image, affine, boxes, points, point_labels, prev_mask):
        self.calls.append((np.asarray(points).copy(), np.asarray(point_labels).copy()))
        out = np.zeros(self.gt.shape, bool) if prev_mask is None else prev_mask.astype(bool)
        ii = np.indices(self.gt.shape).reshape(3, -1).T
        for p in np.asarray(points)[np.asarray(point_labels) == 1]:
            out |= (((ii - p) ** 2).sum(1) <= 16).reshape(self.gt.shape) & self.gt
        return out.astype(np.uint8)


def test_evaluator_strokes_protocol_passes_stroke_points_and_beats_clicks_for_a_point_like_method():
    gt = _box((40, 24, 16), (4, 6, 4), (35, 17, 11))
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    res = {}
    for corrections in ("clicks", "strokes"):
        m = Painter(gt)
        rec = evaluate_structure(m, gt.astype(np.float32), aff, gt, np.random.default_rng(0), n_clicks=3,
                                 start="click", corrections=corrections, measure_memory=False)
        res[corrections] = rec
        n_points = [len(c[0]) for c in m.calls]
        if corrections == "clicks":
            assert n_points == [1, 2, 3, 4] and "strokes" not in rec
        else:  # the start click, then every stroke's points (more than one each)
            assert n_points[0] == 1 and all(b - a > 1 for a, b in zip(n_points, n_points[1:]))
            assert [s["points"] for s in rec["strokes"]] == [n - 1 for n in n_points[1:]]
            assert all(s["foreground"] for s in rec["strokes"]) and len(rec["clicks"]) == 3
    assert res["strokes"]["final_dsc"] > res["clicks"]["final_dsc"]
    assert res["strokes"]["dsc"][0] == res["clicks"]["dsc"][0]  # the same start
    assert run_name("ensam", "box", "strokes") == "ensam (strokes)"
    assert run_name("ensam", "click", "strokes") == "ensam (click start, strokes)"
    assert run_name("ensam", "click") == "ensam (click start)" and run_name("ensam", "box") == "ensam"
    with pytest.raises(ValueError, match="corrections"):
        evaluate_structure(Painter(gt), gt, aff, gt, np.random.default_rng(0), corrections="lasso")


# ------------------------------------------------------------------------------------------------ training loop
def test_loop_stroke_option_off_by_default_and_on_gives_stroke_points():
    gt = _box((16, 16, 16), (3, 3, 3), (12, 12, 12))
    pred = gt.copy()
    pred[3:13, 3:13, 3:8] = False
    assert LoopConfig().p_stroke == 0.0
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    pts, fg = _correction(pred, gt, a, LoopConfig())
    click = next_click(pred, gt, b)
    assert pts.tolist() == [click[0].tolist()] and fg == click[1]
    assert a.random() == b.random()  # the default draws exactly what the click rule draws
    pts, fg = _correction(pred, gt, np.random.default_rng(5), LoopConfig(p_stroke=1.0, stroke_step=2.0))
    assert fg is True and 1 < len(pts) <= LoopConfig().stroke_points and np.all(gt[tuple(pts.T)] & ~pred[tuple(pts.T)])


def test_unrolled_loss_with_strokes_runs():
    from lib.network import NetworkConfig, build_network
    from lib.training.loop import Case

    torch.manual_seed(0)
    net = build_network(NetworkConfig(filters=8, blocks=(1, 1, 1), depth=1, heads=2, num_labels=8,
                                      roi_size=(16, 16, 16)))
    g = _box((16, 16, 16), (4, 5, 4), (11, 11, 10))
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    x = x + torch.as_tensor(g, dtype=torch.float32)[None, None] * 0.5
    case = Case(x, g, np.array([[3, 4, 3], [12, 12, 11]], np.float32), np.array([2, 3]))
    cfg = LoopConfig.on_grid((16, 16, 16), p_stroke=1.0)
    loss, dices = unrolled_loss(net, case, 2, np.random.default_rng(0), cfg)
    assert torch.isfinite(loss) and len(dices) >= 1
    loss.backward()
    assert any(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
