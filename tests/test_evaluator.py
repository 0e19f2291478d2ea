"""Interactive evaluator (lib.evaluation): metrics, protocol and CLI on synthetic volumes with known answers."""

import json

import numpy as np
import pytest

from lib.evaluation import auc, dice, protocol_nsd, surface_dice
from lib.evaluation.baselines import BoxFill, GraphCut, RandomWalker, RegionGrowing
from lib.evaluation.evaluator import evaluate_structure, summarize

AFF = np.diag([1.0, 1.0, 1.0, 1.0])


def _cube(shape, lo, hi):
    m = np.zeros(shape, dtype=np.uint8)
    m[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = 1
    return m


class Perfect:
    name = "perfect"

    def __init__(self, gt):
        self.gt = gt

    def predict(self, image, affine, boxes, points, point_labels, prev_mask):
        return self.gt.copy()


class Empty:
    name = "empty"

    def predict(self, image, affine, boxes, points, point_labels, prev_mask):
        return np.zeros(image.shape, np.uint8)


class Spy:
    """Returns half of the ground truth first, then adds what the clicks point at; records the calls."""

    name = "spy"

    def __init__(self, gt):
        self.gt, self.calls, self.resets = gt, [], 0

    def reset(self):
        self.resets += 1

    def predict(self, image, affine, boxes, points, point_labels, prev_mask):
        self.calls.append((list(map(np.copy, boxes)), np.copy(points), np.copy(point_labels),
                           None if prev_mask is None else prev_mask.copy()))
        out = np.zeros_like(self.gt) if prev_mask is None else prev_mask.copy()
        if prev_mask is None:
            out[: self.gt.shape[0] // 2] = self.gt[: self.gt.shape[0] // 2]
        for p in np.asarray(points).reshape(-1, 3):
            out[tuple(p)] = self.gt[tuple(p)]
        return out


# ------------------------------------------------------------------------------------------------ metrics
def test_dice_basics():
    a = _cube((10, 10, 10), (0, 0, 0), (4, 4, 4))
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    b = _cube((10, 10, 10), (0, 0, 0), (4, 4, 1))  # 50 of a's 125 voxels
    assert dice(a, b) == pytest.approx(2 * 50 / 175)


def test_auc_arithmetic():
    assert auc([1, 1, 1, 1, 1]) == 4.0
    assert auc([0, 0.5, 1, 1, 1]) == pytest.approx(0.25 + 0.75 + 1 + 1)
    assert auc([0.2, 0.4, 0.6, 0.8, 1.0]) == pytest.approx(2.4)
    assert auc([0, 0, 0, 0, 0]) == 0.0


def test_nsd_identity_and_empty():
    a = _cube((20, 20, 20), (5, 5, 5), (12, 12, 12))
    assert surface_dice(a, a, (1, 1, 1)) == 1.0
    assert surface_dice(a, np.zeros_like(a), (1, 1, 1)) == 0.0
    assert surface_dice(np.zeros_like(a), np.zeros_like(a), (1, 1, 1)) == 1.0


def test_nsd_tolerance_with_anisotropic_spacing():
    gt = _cube((30, 30, 30), (8, 8, 8), (20, 20, 20))
    shift_i = np.roll(gt, 2, axis=0)  # 2 voxels along i
    shift_k = np.roll(gt, 1, axis=2)  # 1 voxel along k
    sp = (1.0, 1.0, 3.0)  # anisotropic: 1 mm in-plane, 3 mm along k
    # 2 voxels x 1 mm = 2 mm: inside the 2 mm tolerance (inclusive)
    assert surface_dice(shift_i, gt, sp, 2.0) == pytest.approx(1.0)
    # 1 voxel x 3 mm = 3 mm on the k faces: those surface voxels fail, the side faces still agree
    nsd_k = surface_dice(shift_k, gt, sp, 2.0)
    assert 0.5 < nsd_k < 1.0
    assert surface_dice(shift_k, gt, sp, 3.0) == pytest.approx(1.0)
    # isotropic 1 mm: the same 1-voxel shift along k is within tolerance
    assert surface_dice(shift_k, gt, (1.0, 1.0, 1.0), 2.0) == pytest.approx(1.0)
    # 3 voxels x 1 mm along i: the i faces fail
    assert surface_dice(np.roll(gt, 3, axis=0), gt, sp, 2.0) < 1.0


def test_nsd_matches_monai_on_random_blobs():
    import monai.metrics as monai_metrics
    import torch
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for sp in [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5)]:
        a = ndimage.gaussian_filter(rng.random((40, 36, 24)), 3) > 0.5
        b = ndimage.gaussian_filter(rng.random((40, 36, 24)), 3) > 0.5
        a[[0, -1]] = b[[0, -1]] = False  # keep the image border out of the comparison
        a[:, [0, -1]] = b[:, [0, -1]] = False
        a[:, :, [0, -1]] = b[:, :, [0, -1]] = False
        ours = surface_dice(a, b, sp, 2.0)
        oh = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))  # noqa: E731
        ref = monai_metrics.compute_surface_dice(oh(a), oh(b), class_thresholds=[2.0], include_background=False,
                                                 spacing=list(sp)).item()
        assert ours == pytest.approx(ref, abs=1e-6)


def test_protocol_nsd_zero_below_dsc_threshold():
    gt = _cube((20, 20, 20), (5, 5, 5), (14, 14, 14))
    small = _cube((20, 20, 20), (5, 5, 5), (6, 6, 6))  # DSC ~ 0.016
    assert dice(small, gt) < 0.2
    assert surface_dice(small, gt, (1, 1, 1)) > 0  # surfaces touch at a corner region
    assert protocol_nsd(small, gt, (1, 1, 1)) == 0.0


# ------------------------------------------------------------------------------------------------ protocol
def test_perfect_method_scores_one_and_auc_four():
    gt = _cube((24, 24, 24), (6, 7, 8), (15, 16, 17)).astype(bool)
    image = gt.astype(np.int16) * 100
    rec = evaluate_structure(Perfect(gt), image, AFF, gt, np.random.default_rng(0))
    assert rec["dsc"] == [1.0] * 6 and rec["nsd"] == [1.0] * 6
    assert rec["dsc_auc"] == 4.0 and rec["nsd_auc"] == 4.0
    assert rec["final_dsc"] == 1.0 and rec["box_dsc"] == 1.0
    assert rec["no_click"] == [1, 2, 3, 4, 5]  # nothing wrong, no click, predict not called again
    assert rec["seconds"][1:] == [None] * 5


def test_box_fill_on_cube_is_perfect_without_jitter():
    gt = _cube((24, 24, 24), (3, 4, 5), (18, 12, 20))
    rec = evaluate_structure(BoxFill(), gt * 50, AFF, gt, np.random.default_rng(0), jitter=0)
    assert rec["box_dsc"] == 1.0 and rec["final_dsc"] == 1.0 and rec["final_nsd"] == 1.0
    # with jitter the box is larger (never smaller): DSC <= 1 and the box contains the cube
    rec = evaluate_structure(BoxFill(), gt * 50, AFF, gt, np.random.default_rng(1), jitter=3)
    b = rec["box"]
    assert b[0] <= 3 and b[1] >= 18 and b[2] <= 4 and b[3] >= 12 and b[4] <= 5 and b[5] >= 20
    assert 0.5 < rec["box_dsc"] <= 1.0


def test_empty_method_scores_zero():
    gt = _cube((20, 20, 20), (5, 5, 5), (12, 12, 12))
    rec = evaluate_structure(Empty(), gt, AFF, gt, np.random.default_rng(0))
    assert rec["dsc"] == [0.0] * 6 and rec["nsd"] == [0.0] * 6
    assert rec["dsc_auc"] == 0.0 and rec["nsd_auc"] == 0.0
    assert all(c is not None and c[3] == 1 for c in rec["clicks"])  # always a foreground click


def test_prompts_accumulate_and_prev_mask_is_passed():
    gt = _cube((24, 24, 24), (4, 4, 4), (19, 19, 19))
    spy = Spy(gt)
    rec = evaluate_structure(spy, gt, AFF, gt, np.random.default_rng(0))
    assert spy.resets == 1
    assert len(spy.calls) == 1 + sum(c is not None for c in rec["clicks"])
    boxes0, pts0, lab0, prev0 = spy.calls[0]
    assert len(boxes0) == 1 and pts0.shape == (0, 3) and lab0.shape == (0,) and prev0 is None
    for n, (boxes, pts, labs, prev) in enumerate(spy.calls[1:], start=1):
        assert pts.shape == (n, 3) and labs.shape == (n,)
        assert np.array_equal(boxes[0], boxes0[0])  # same box every step
        assert prev is not None and prev.shape == gt.shape
    # each click sits in the error of the step before and is labelled by the ground truth
    for c in rec["clicks"]:
        if c is not None:
            assert c[3] == int(gt[tuple(c[:3])])
    assert rec["dsc"][-1] > rec["dsc"][0]


def test_click_start_gives_one_deep_foreground_click_and_never_a_box():
    gt = _cube((24, 24, 24), (4, 6, 8), (17, 19, 21))  # centre (10.5, 12.5, 14.5): deepest voxels around it
    spy = Spy(gt)
    rec = evaluate_structure(spy, gt, AFF, gt, np.random.default_rng(0), start="click")
    boxes0, pts0, lab0, prev0 = spy.calls[0]
    assert boxes0 == [] and prev0 is None and lab0.tolist() == [1]
    assert gt[tuple(pts0[0])] and np.all(np.abs(pts0[0] - [10.5, 12.5, 14.5]) <= 1)
    assert rec["start"] == "click" and rec["box"] is None and rec["first_click"] == pts0[0].tolist()
    for n, (boxes, pts, labs, prev) in enumerate(spy.calls[1:], start=2):
        assert boxes == [] and pts.shape == (n, 3) and prev is not None  # the first click stays in the prompt
    with pytest.raises(ValueError, match="start"):
        evaluate_structure(spy, gt, AFF, gt, np.random.default_rng(0), start="lasso")


def _one_sphere_dataset(folder, shape, centre, r):
    """A dataset.json folder with one bright sphere named 'sphere'; returns its ground truth."""
    import nibabel as nib
    (folder / "im").mkdir()
    image, gt = _bright_sphere(shape, centre, r)
    nib.save(nib.Nifti1Image(image, AFF), str(folder / "im" / "a.nii.gz"))
    nib.save(nib.Nifti1Image(gt.astype(np.uint8), AFF), str(folder / "im" / "a_lab.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"testing": [
        {"image": "im/a.nii.gz", "label": "im/a_lab.nii.gz", "labels": {"1": "sphere"}}]}))
    return gt


def test_both_starts_are_reported_side_by_side(tmp_path):
    from lib.evaluation.evaluator import evaluate, results_markdown

    _one_sphere_dataset(tmp_path, (28, 26, 20), (14, 13, 10), 6)
    res = evaluate([RegionGrowing()], tmp_path, progress=False, log=lambda m: None, starts=("box", "click"))
    assert set(res["methods"]) == {"region_growing", "region_growing (click start)"}
    assert res["protocol"]["starts"] == ["box", "click"]
    click = res["methods"]["region_growing (click start)"]["structures"][0]
    assert click["start"] == "click" and click["box"] is None
    assert "| region_growing (click start) |" in results_markdown(res)


def test_failing_method_scores_zero_and_records_error():
    class Boom:
        name = "boom"

        def predict(self, *a):
            raise RuntimeError("kaput")

    gt = _cube((16, 16, 16), (4, 4, 4), (10, 10, 10))
    rec = evaluate_structure(Boom(), gt, AFF, gt, np.random.default_rng(0))
    assert rec["final_dsc"] == 0.0 and len(rec["errors"]) == 6 and "kaput" in rec["errors"][0]


def test_deterministic_given_seed_and_summary():
    gt = _cube((24, 24, 24), (4, 6, 8), (16, 18, 20))
    r1 = evaluate_structure(Spy(gt), gt, AFF, gt, np.random.default_rng(3))
    r2 = evaluate_structure(Spy(gt), gt, AFF, gt, np.random.default_rng(3))
    assert r1["box"] == r2["box"] and r1["clicks"] == r2["clicks"] and r1["dsc"] == r2["dsc"]
    s = summarize([r1, r2])
    assert s["n_structures"] == 2 and len(s["dsc_curve"]) == 6
    assert s["final_dsc"] == pytest.approx(r1["final_dsc"])


# ------------------------------------------------------------------------------------------------ baselines
def _bright_sphere(shape=(36, 36, 28), centre=(18, 17, 14), r=8, seed=0):
    rng = np.random.default_rng(seed)
    g = np.ogrid[tuple(slice(0, s) for s in shape)]
    gt = (sum((gg - c) ** 2 for gg, c in zip(g, centre)) <= r * r).astype(np.uint8)
    image = (gt * 200 + rng.normal(0, 20, shape)).astype(np.int16)
    return image, gt


@pytest.mark.parametrize("cls", [GraphCut, RandomWalker, RegionGrowing])
def test_baselines_segment_a_bright_sphere(cls):
    image, gt = _bright_sphere()
    rec = evaluate_structure(cls(), image, AFF, gt, np.random.default_rng(0), n_clicks=3)
    # defaults are tuned on real CT, not on this toy: ask for a sensible result, not a perfect one
    assert rec["box_dsc"] > 0.6, rec["dsc"]
    assert max(rec["dsc"][1:]) >= rec["box_dsc"] - 0.02, rec["dsc"]
    assert not rec["errors"]


def test_normalise_is_monotone_and_bounded():
    from lib.evaluation.baselines import _normalise

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-1000, 5, 5000), rng.normal(40, 10, 20000), rng.normal(700, 50, 500)])
    y = _normalise(x.reshape(50, 51, 10))
    assert y.min() >= 0 and y.max() <= 1
    order = np.argsort(x)
    assert np.all(np.diff(y.ravel()[order]) >= -1e-6)
    # soft tissue (40 +- 10) gets far more of the range than a linear -1000..700 map would give it
    soft = y.ravel()[(x > 20) & (x < 60)]
    assert soft.max() - soft.min() > 4 * (40 / 1700)


def test_baselines_use_background_clicks():
    # two touching spheres of the same brightness: a background click on the wrong one must shrink the mask
    image, gt = _bright_sphere(centre=(12, 17, 14), r=7)
    _, other = _bright_sphere(centre=(25, 17, 14), r=7)
    image = image + (other * 200).astype(np.int16)
    box = [np.array([4, 33, 9, 25, 6, 22])]
    for m in (RegionGrowing(), GraphCut()):
        p0 = m.predict(image, AFF, box, np.array([[12, 17, 14]]), np.array([1]), None)
        p1 = m.predict(image, AFF, box, np.array([[12, 17, 14], [25, 17, 14]]), np.array([1, 0]), p0)
        assert p1[25, 17, 14] == 0 and p1[12, 17, 14] == 1, m.name
        assert dice(p1, gt) >= dice(p0, gt), m.name


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_three_files(tmp_path):
    import nibabel as nib
    from lib.evaluation.__main__ import main

    data = tmp_path / "data"
    (data / "imagesTs").mkdir(parents=True)
    (data / "labelsTs").mkdir(parents=True)
    entries = []
    for n, (shape, sp) in enumerate([((28, 26, 20), (1.0, 1.0, 2.0)), ((24, 24, 24), (0.8, 0.8, 0.8))]):
        image, gt = _bright_sphere(shape, tuple(s // 2 for s in shape), 6, seed=n)
        lab = gt.copy()
        lab[2:6, 2:6, 2:6] = 2  # a second, small structure
        aff = np.diag(list(sp) + [1.0])
        nib.save(nib.Nifti1Image(image, aff), str(data / "imagesTs" / f"c{n}.nii.gz"))
        nib.save(nib.Nifti1Image(lab.astype(np.uint8), aff), str(data / "labelsTs" / f"c{n}.nii.gz"))
        entries.append({"image": f"imagesTs/c{n}.nii.gz", "label": f"labelsTs/c{n}.nii.gz", "modality": "CT",
                        "labels": {"1": "sphere", "2": "corner"}})
    (data / "dataset.json").write_text(json.dumps({"testing": entries}))
    out = tmp_path / "out"
    rc = main(["--data", str(data), "--out", str(out), "--methods", "box_fill,region_growing",
               "--no-progress", "--max-structures", "2"])
    assert rc == 0
    for f in ("results.json", "results.md", "dsc_vs_step.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"box_fill", "region_growing"}
    assert res["methods"]["box_fill"]["overall"]["n_structures"] == 4
    md = (out / "results.md").read_text()
    assert "| box_fill |" in md and "DSC_AUC" in md and "sphere" in md


def test_ensam_adapter_runs_the_protocol():
    import lib.engine as engine_mod  # a product import error is a failure, never a skip
    from lib.evaluation.evaluator import EnsamMethod
    from lib.network import NetworkConfig, build_network

    cfg = NetworkConfig(filters=4, blocks=(1, 1, 1), heads=2, depth=1, roi_size=(24, 24, 24), num_labels=8)
    method = EnsamMethod(engine=engine_mod.EnsamEngine(network=build_network(cfg)))
    image, gt = _bright_sphere((30, 28, 20), (15, 14, 10), 5)
    rec = evaluate_structure(method, image, np.diag([1.0, 1.0, 2.0, 1.0]), gt, np.random.default_rng(0), n_clicks=2)
    assert not rec["errors"], rec["errors"]  # untrained weights: only the plumbing is checked
    assert len(rec["dsc"]) == 3 and all(0.0 <= d <= 1.0 for d in rec["dsc"])


def test_baselines_without_a_box_look_around_the_clicks():
    """Click start: a baseline gets no box; its view is the clicks (and previous mask) grown by CLICK_VIEW_MM."""
    from lib.evaluation.baselines import CLICK_VIEW_MM, _box_array

    shape = (120, 100, 80)
    b = _box_array([], shape, points=[[60, 50, 40]], spacing=np.array([2.0, 2.0, 4.0]))
    half = np.ceil(CLICK_VIEW_MM / np.array([2.0, 2.0, 4.0]))
    assert b.tolist() == [60 - half[0], 60 + half[0], 50 - half[1], 50 + half[1], 40 - half[2], 40 + half[2]]
    prev = np.zeros(shape, bool)
    prev[5:10, 5:10, 5:10] = True  # the previous mask widens the view
    assert _box_array([], shape, [[60, 50, 40]], np.array([2.0, 2.0, 4.0]), prev)[0::2].tolist() == [0, 0, 0]
    image, gt = _bright_sphere((60, 60, 40), (30, 30, 20), 7)
    rec = evaluate_structure(GraphCut(), image, AFF, gt, np.random.default_rng(0), n_clicks=2, start="click")
    assert rec["dsc"][0] > 0.5 and rec["errors"] == []


def test_diagnostics_on_a_tiny_set(tmp_path):
    from lib.evaluation.diagnose import click_effects, grid_ceiling

    gt = _one_sphere_dataset(tmp_path, (40, 40, 30), (20, 20, 15), 8)
    (row,) = grid_ceiling(str(tmp_path))
    assert row[1] == "sphere" and row[3] > 0.95 and row[4] > 0.95  # a sphere fits a 64^3 grid
    effects = click_effects(Spy(gt), str(tmp_path), clicks=3)
    rows = effects["fg"] + effects["bg"]
    assert rows and all(h for h, _, _ in rows)  # the spy sets every clicked voxel right
    assert all(changed >= 1 and d >= 0 for _, d, changed in rows)


def test_lone_click_views_follow_the_view_setting(tmp_path):
    """diagnose views: each view is applied through the contract (then restored); the answer's size is reported in
    mm against the truth. A stand-in engine answers a cube of a third of the view around the click."""
    from lib.contract import legacy_contract
    from lib.evaluation.diagnose import lone_click_views

    gt = _one_sphere_dataset(tmp_path, (60, 60, 40), (30, 30, 20), 8)

    class CubeEngine:
        contract = legacy_contract()

        def segment(self, image, affine, points, point_labels, image_key=None):
            half = int(self.contract.roi.click_extent_mm / 6)  # 1 mm voxels: a cube a third of the view wide
            c = np.asarray(points[0])
            m = np.zeros(image.shape, np.uint8)
            m[tuple(slice(max(x - half, 0), x + half) for x in c)] = 1
            return m

    eng = CubeEngine()
    (row,) = lone_click_views(eng, str(tmp_path), views=(24, 48, 96), features=True)
    assert row["structure"] == "sphere" and abs(row["size_mm"] - (gt.sum()) ** (1 / 3)) < 0.1
    assert row["answer_mm"] == [8.0, 16.0, 32.0]
    fill = [f["fill"] for f in row["features"]]
    assert np.allclose(fill, 1 / 3, atol=0.01)  # the stand-in answers a third of every view
    assert row["features"][1]["agree_prev"] == pytest.approx(2 * 8 ** 3 / (8 ** 3 + 16 ** 3), abs=1e-6)
    assert row["features"][0]["agree_prev"] == row["features"][0]["agree_next"]  # one neighbour at the ends
    assert row["dsc"][1] == max(row["dsc"])  # the 16 mm cube fits the 8-voxel-radius sphere best
    assert eng.contract.roi.click_extent_mm == legacy_contract().roi.click_extent_mm


def test_answer_features_tell_an_answer_on_the_object_from_one_inside_it(tmp_path):
    """diagnose views --select: an answer that is the bright sphere has a strong edge and contrast; a cube inside the
    sphere (homogeneous on both sides of its border) has neither; fill and touch follow the view."""
    from lib.evaluation.diagnose import answer_features

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(48)] * 3, indexing="ij"))
    sphere = ((grid - 24) ** 2).sum(0) <= 10 ** 2
    image = np.where(sphere, 200.0, 20.0) + rng.normal(0, 5, sphere.shape)
    inner = np.zeros_like(sphere)
    inner[20:29, 20:29, 20:29] = True
    on, inside = (answer_features(image, m, (1, 1, 1), (24, 24, 24), 64.0) for m in (sphere, inner))
    assert on["contrast"] > 3 * inside["contrast"] and on["edge"] > 2 * inside["edge"]
    assert abs(on["fill"] - sphere.sum() ** (1 / 3) / 64) < 1e-6 and on["touch"] == 0.0
    assert answer_features(image, sphere, (1, 1, 1), (24, 24, 24), 20.0)["touch"] == 1.0  # 10 mm >= 0.45 x 20
    assert answer_features(image, np.zeros_like(sphere), (1, 1, 1), (24, 24, 24), 64.0)["fill"] == 0.0


def test_view_selection_learns_from_the_other_images():
    """select_views: when one feature tracks the DSC, the view it picks on each image (fitted on the others only)
    is the best one; with one image there is nothing to fit on and the best view on average is taken."""
    from lib.evaluation.diagnose import FEATURES, select_views

    rng = np.random.default_rng(1)
    rows = []
    for image in ("a", "b", "c"):
        for _ in range(6):
            d = rng.uniform(0, 1, 4)
            feats = [dict.fromkeys(FEATURES, 0.5) | {"contrast": float(v), "edge": float(rng.uniform())} for v in d]
            rows.append({"image": image, "dsc": d.tolist(), "features": feats})
    picked = select_views(rows, alpha=0.01)
    assert picked.tolist() == [int(np.argmax(r["dsc"])) for r in rows]
    one = [dict(r, image="a") for r in rows]
    assert set(select_views(one).tolist()) == {int(np.argmax(np.mean([r["dsc"] for r in one], 0)))}


def test_runs_merge_into_one_report_with_renames_and_the_tail_kept(tmp_path):
    """lib.evaluation.merge: two runs (one renamed) become one report, box-start rows first; a method given twice,
    or runs of another protocol, are refused; --keep-tail keeps the hand-written sections after the report; --plot
writes the merged curves."""
    from lib.evaluation.evaluator import evaluate
    from lib.evaluation.merge import main as merge_main
    from lib.evaluation.merge import merge_results

    data = tmp_path / "data"
    data.mkdir()
    _one_sphere_dataset(data, (28, 26, 20), (14, 13, 10), 6)
    quiet = dict(progress=False, log=lambda m: None)
    a = evaluate([RegionGrowing()], data, starts=("box", "click"), **quiet)
    b = evaluate([BoxFill()], data, starts=("box",), **quiet)
    for name, res in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(res, default=float))
    out = tmp_path / "EVALUATION.md"
    out.write_text("# old report\n\nMachine: old.\n\n## Hand-written section\n\nkept text\n")
    merge_main([str(out), str(tmp_path / "a.json"), f"{tmp_path / 'b.json'}:box_fill=box fill, renamed",
                "--keep-tail", "--plot", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = out.read_text()
    rows = [line.split("|")[1].strip() for line in text.split("## Per image")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    assert rows == ["region_growing", "box fill, renamed", "region_growing (click start)"]
    assert text.rstrip().endswith("## Hand-written section\n\nkept text") and "# old report" not in text
    box_fill_dsc = b["methods"]["box_fill"]["overall"]["box_dsc"]
    assert f"| box fill, renamed | 1 | {box_fill_dsc:.3f} |" in text
    with pytest.raises(ValueError, match="given twice"):
        merge_results([(a, {}), (a, {})])
    other = json.loads(json.dumps(b, default=float))
    other["protocol"]["seed"] = 1
    with pytest.raises(ValueError, match="seed"):
        merge_results([(a, {}), (other, {})])


def test_each_protocol_run_starts_from_a_clean_method(tmp_path):
    """new_run() is called before every (start, correction) run on every image, and the ensam adapter forgets its
    engine's cached encodings and ROIs there: the click start must not reuse the ROIs that the box start fitted to
    the same structure from its ground-truth box."""
    import lib.engine as engine_mod  # a product import error is a failure, never a skip
    from lib.evaluation.evaluator import EnsamMethod, evaluate
    from lib.network import NetworkConfig, build_network

    class Recorder(RegionGrowing):
        def __init__(self):
            super().__init__()
            self.calls = []

        def new_run(self):
            self.calls.append("new_run")

        def predict(self, image, affine, boxes, points, point_labels, prev_mask):
            self.calls.append("box" if boxes else "click")
            return super().predict(image, affine, boxes, points, point_labels, prev_mask)

    _one_sphere_dataset(tmp_path, (28, 26, 20), (14, 13, 10), 6)
    rec = Recorder()
    evaluate([rec], tmp_path, n_clicks=1, progress=False, log=lambda m: None, starts=("box", "click"))
    assert rec.calls[0] == "new_run" and rec.calls.count("new_run") == 2
    second = rec.calls.index("new_run", 1)
    assert "box" in rec.calls[:second] and "box" not in rec.calls[second:]  # the click run starts clean

    cfg = NetworkConfig(filters=4, blocks=(1, 1, 1), heads=2, depth=1, roi_size=(24, 24, 24), num_labels=8)
    method = EnsamMethod(engine=engine_mod.EnsamEngine(network=build_network(cfg)))
    image, gt = _bright_sphere((30, 28, 20), (15, 14, 10), 5)
    method.predict(image, AFF, [np.array([8, 22, 8, 21, 5, 15])], np.zeros((0, 3), int), np.zeros(0, int), None)
    assert len(method.engine.cache) > 0
    method.new_run()
    assert len(method.engine.cache) == 0
