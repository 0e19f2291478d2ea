"""The uncertainty score rebuilt as the predicted error of ``ensam_seg``'s answer (issue 29): its features, the
scorer's path for a name of the datastore pool, and the experiment's pieces (lib.experiments.uncertainty_rank), on
tiny synthetic volumes with a stand-in engine."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import synthetic_volume

pytest.importorskip("SimpleITK")

from lib.activelearning.features import (FEATURES, WEIGHTS, answer_atlas_disagreement,  # noqa: E402
                                         atlas_answer_features, predicted_error, registration_mismatch,
                                         route_disagreement, soft_disagreement, volume_deviation)
from lib.atlas.registration import RegistrationConfig  # noqa: E402
from lib.atlas.segment import Atlas, AtlasLibrary, SegmentByExample  # noqa: E402

# affine only on a 4 mm grid: about 0.1 CPU-s per registration of the synthetic study
FAST = RegistrationConfig(grid_mm=4.0, search_mm=6.0, search_top=1, affine_iterations=20, min_cells=0,
                          small_bspline_mm=0.0)


class BoxEngine:
    """Stands in for EnsamEngine: answers the inside of the box, shrunk by ``shrink`` voxels per side."""

    def __init__(self, shrink: int = 1):
        self.shrink, self.calls = shrink, 0

    def segment_step(self, image, affine, points=None, point_labels=None, boxes=None, prev_mask=None, image_key=None,
                     prev_info=None):
        self.calls += 1
        out = np.zeros(np.shape(image), np.uint8)
        b, s = boxes[0], self.shrink
        out[b[0] + s:b[1] + 1 - s, b[2] + s:b[3] + 1 - s, b[4] + s:b[5] + 1 - s] = 1
        return out, {}


def _ball(shape, centre, r):
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (kk - centre[2]) ** 2 <= r * r


def test_each_feature_is_zero_for_an_answer_that_matches_and_grows_with_the_mismatch():
    a = _ball((20, 20, 20), (10, 10, 10), 5)
    shifted = _ball((20, 20, 20), (12, 10, 10), 5)
    far = _ball((20, 20, 20), (3, 3, 3), 2)
    assert answer_atlas_disagreement(a, [a, a]) == 0.0
    assert 0.0 < answer_atlas_disagreement(a, [a, shifted]) < answer_atlas_disagreement(a, [shifted, shifted]) < 1
    assert answer_atlas_disagreement(a, [far]) == 1.0 and answer_atlas_disagreement(a, []) == 1.0
    assert route_disagreement(a, a) == 0.0 and route_disagreement(a, far) == 1.0
    assert route_disagreement(np.zeros_like(a), np.zeros_like(a)) == 1.0  # nothing found is not agreement
    assert volume_deviation(100.0, [100.0, 100.0]) == 0.0
    assert volume_deviation(200.0, [100.0]) == pytest.approx(np.log(2.0))
    assert volume_deviation(50.0, [25.0, 100.0]) == pytest.approx(0.0)  # the geometric mean
    assert volume_deviation(0.0, [100.0]) == pytest.approx(np.log(10.0))
    assert registration_mismatch([-0.8, -0.6]) == pytest.approx(np.exp(-0.7)) and registration_mismatch([]) == 1.0
    assert registration_mismatch([-1.5]) < registration_mismatch([-0.5]) < 1.0  # a better fit, a lower mismatch
    assert soft_disagreement(a, a.astype(float)) == 0.0
    assert 0.0 < soft_disagreement(a, 0.5 * a) < soft_disagreement(a, 0.1 * a) < 1.0


def test_predicted_error_is_the_weighted_mean_of_the_named_features():
    feats = {"answer_atlas": 0.2, "route": 0.4, "volume": 3.0}
    assert predicted_error(feats, {"answer_atlas": 1.0, "route": 1.0}) == pytest.approx(0.3)
    assert predicted_error(feats, {"answer_atlas": 3.0, "route": 1.0}) == pytest.approx(0.25)
    assert predicted_error({}, {"route": 1.0}) == 1.0  # a feature that could not be computed counts 1
    assert set(WEIGHTS) <= set(FEATURES) and all(w > 0 for w in WEIGHTS.values())
    assert 0.0 <= predicted_error({k: 0.0 for k in FEATURES}) and predicted_error({k: 1.0 for k in FEATURES}) <= 1.0
    low = {k: 0.1 for k in FEATURES}
    high = {k: 0.6 for k in FEATURES}
    assert predicted_error(low) < predicted_error(high)


def _atlas_pool(tmp_path, shifts=((3, -2, 1), (-2, 2, 0))):
    import nibabel as nib

    atlases = []
    for n, shift in enumerate(shifts):
        img, lab, aff = synthetic_volume(30 + n, shift)
        paths = [str(tmp_path / f"ds{n}_{k}.nii.gz") for k in ("image", "label")]
        nib.save(nib.Nifti1Image(img, aff), paths[0])
        nib.save(nib.Nifti1Image((lab == 1).astype(np.uint8), aff), paths[1])
        atlases.append(Atlas(f"datastore:ds{n}", paths[0], paths[1], {"blob_a": 1}, "", "datastore"))
    return atlases


def test_atlas_answer_features_of_the_fused_and_the_engine_route(tmp_path):
    atlases = _atlas_pool(tmp_path)
    engine = BoxEngine(shrink=1)
    seg = SegmentByExample(AtlasLibrary(atlases, FAST), engine, corrections=0)
    img, lab, aff = synthetic_volume(1)
    s, feats = atlas_answer_features(seg, img, aff, "blob_a", "atlas", "target", use_engine=True)
    assert set(feats) == set(FEATURES) and s is not None
    assert 0.0 <= feats["answer_atlas"] < 0.35 and 0.0 < feats["route"] < 1.0  # the box answer differs from fusion
    assert feats["volume"] < 0.3 and 0.0 < feats["registration"] < 1.0  # about as large as the examples; exp(-MI)
    # the engine's route: the answer is the box's inside, farther from every atlas than the fused mask
    s2, feats2 = atlas_answer_features(seg, img, aff, "blob_a", "atlas+ensam", "target")
    assert feats2["answer_atlas"] > feats["answer_atlas"] and feats2["route"] == pytest.approx(feats["route"])
    np.testing.assert_array_equal(s2.mask_crop, s.mask_crop)
    # without the engine (the atlas route needs none): the same fused answer, the engine's feature left out
    calls = engine.calls
    s3, feats3 = atlas_answer_features(seg, img, aff, "blob_a", "atlas", "target", use_engine=False)
    assert engine.calls == calls and "route" not in feats3 and s3.source == "atlas"
    assert feats3["answer_atlas"] == pytest.approx(feats["answer_atlas"])
    # a name no atlas carries: nothing answered, every feature at 1
    none, worst = atlas_answer_features(seg, img, aff, "liver", "atlas", "target")
    assert none is None and worst == {k: 1.0 for k in FEATURES} and predicted_error(worst) == 1.0


def test_the_scorer_predicts_the_error_of_the_datastore_pool_answer(tmp_path):
    from lib.activelearning.scoring import UncertaintyScoring
    from lib.infers.seg_by_example import EnsamSegByExample

    atlases = _atlas_pool(tmp_path)
    reference = Atlas("ref0", atlases[0].image_path, atlases[0].label_path, {"blob_b": 1}, "MR", "reference")
    library = AtlasLibrary(atlases + [reference], FAST)
    by_example = SimpleNamespace(library=library, seg=SegmentByExample(library))
    # the task's own way to build the segmenter (ensam_seg's answer), on this stand-in of the task
    by_example._datastore_carriers = lambda: EnsamSegByExample._datastore_carriers(by_example)
    by_example.segmenter = lambda *a: EnsamSegByExample.segmenter(by_example, *a)
    scorer = UncertaintyScoring(None, None, by_example=by_example)
    img, lab, aff = synthetic_volume(1)
    vol = SimpleNamespace(array=img, affine=aff, key="target")
    engine = BoxEngine(shrink=1)
    segs = {}
    got, feats = scorer._atlas_error(vol, "blob_a", {"route": "atlas+ensam", "pool": "datastore", "atlases": 2},
                                     engine, segs)
    assert got == pytest.approx(predicted_error(feats)) and "route" in feats
    seg = segs["blob_a"]
    assert [a.key for a in seg.library.atlases] == ["datastore:ds0", "datastore:ds1"]  # the datastore's only
    assert seg.fusion == "local" and 0.0 <= got < 1.0 and engine.calls >= 1  # the engine's route: it answered
    if "volume" in WEIGHTS:  # the labelled examples' volumes, read once per label file
        assert len(scorer._volumes_mm3) == 2
    # an engine whose answer departs further from the atlases (a box shrunk by 4 voxels) predicts a larger error
    worse, _ = scorer._atlas_error(vol, "blob_a", {"route": "atlas+ensam", "pool": "datastore"},
                                   BoxEngine(shrink=4), {})
    assert worse > got


def test_the_experiment_chooses_the_route_by_leave_one_out_and_scores_the_unlabelled(tmp_path):
    import nibabel as nib

    from lib.experiments.labelling_loop.instances import Instance
    from lib.experiments.uncertainty_rank import SCORES, _Family, route_by_leave_one_out, score_instance

    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "labels")
    instances = []
    for n, shift in enumerate([(0, 0, 0), (2, -1, 0), (-2, 1, 1), (1, 2, -1)]):
        img, lab, aff = synthetic_volume(40 + n, shift)
        nib.save(nib.Nifti1Image(img, aff), str(tmp_path / "images" / f"i{n}.nii.gz"))
        gt = str(tmp_path / "labels" / f"i{n}.nii.gz")
        nib.save(nib.Nifti1Image((lab == 1).astype(np.uint8), aff), gt)
        instances.append(Instance(f"i{n}", f"scan{n}", 1, "blob_a", int((lab == 1).sum()), [], gt))
    fam = _Family(instances, "MR", BoxEngine(shrink=1), reg_cfg=FAST)
    route = route_by_leave_one_out(fam, ["i0", "i1"])
    assert route["route"] in ("atlas", "atlas+ensam") and set(route["validation"]) == {"atlas", "atlas+ensam"}
    assert route["validation"]["atlas"] > 0.6  # the fused mask of a shifted copy finds the blob
    rows = [score_instance(fam, t, ["i0", "i1"], route["route"]) for t in ("i2", "i3")]
    for r in rows:
        assert set(SCORES) <= set(r) and 0.0 <= r["error"] <= 1.0 and r["error"] < 0.5
        assert 0.0 <= r["old"] <= 1.0 and 0.0 <= r["new"] <= 1.0


def test_spearman_needs_three_pairs_and_two_values():
    from lib.experiments.uncertainty_rank import spearman

    assert spearman([0.1, 0.2], [0.3, 0.4])["rho"] is None
    assert spearman([0.1, 0.1, 0.1], [0.3, 0.4, 0.5])["rho"] is None
    got = spearman([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.9, 1.0])
    assert got["rho"] == pytest.approx(1.0) and got["n"] == 4
    assert spearman([0.4, 0.3, 0.2, 0.1], [0.5, 0.6, 0.9, 1.0])["rho"] == pytest.approx(-1.0)
