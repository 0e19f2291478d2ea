"""Segmentation by example without the server (issue 12): registration, fusion, prompts, the pipeline."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import synthetic_volume

sitk = pytest.importorskip("SimpleITK")

from lib.atlas.fusion import fuse, pairwise_agreement  # noqa: E402
from lib.atlas.prompting import deepest_points, prompts_from_fused  # noqa: E402
from lib.atlas.registration import (RegistrationConfig, guess_modality, prepare, propagate, register,  # noqa: E402
                                    to_sitk)
from lib.atlas.segment import AtlasLibrary, SegmentByExample  # noqa: E402
from lib.evaluation.metrics import dice  # noqa: E402

FAST = RegistrationConfig(grid_mm=3.0, search_mm=6.0, affine_iterations=40)


def _warped(seed: int):
    """The synthetic study shifted by a few voxels and stretched by 8 % along i (a moved, warped copy)."""
    img, lab, aff = synthetic_volume(seed, shift=(3, -2, 1))
    aff = aff.copy()
    aff[:3, 0] *= 1.08
    return img, lab, aff


def test_to_sitk_keeps_the_world_position_of_every_voxel():
    img, _, aff = synthetic_volume(1)
    s = to_sitk(img, aff)
    ijk = (5, 7, 3)
    lps = np.asarray(s.TransformIndexToPhysicalPoint(ijk))
    ras = (aff @ np.array([*ijk, 1.0]))[:3]
    np.testing.assert_allclose(lps, ras * np.array([-1, -1, 1]), atol=1e-5)
    assert s[ijk] == pytest.approx(float(img[ijk]))


def test_registration_of_a_moved_warped_copy_recovers_the_labels():
    fixed_img, fixed_lab, fixed_aff = synthetic_volume(1)
    mov_img, mov_lab, mov_aff = _warped(2)
    fixed = to_sitk(fixed_img, fixed_aff)
    before = [dice(mov_lab == v, fixed_lab == v) for v in (1, 2)]  # the atlas's voxels taken as they are
    reg = register(prepare(fixed, "MR", FAST), prepare(to_sitk(mov_img, mov_aff), "MR", FAST), FAST)
    moved = propagate(to_sitk(mov_lab, mov_aff, np.int16), fixed, reg.transform)
    assert moved.shape == fixed_lab.shape
    after = [dice(moved == v, fixed_lab == v) for v in (1, 2)]
    print(f"\nDSC before {np.round(before, 3)} after {np.round(after, 3)}; {reg.seconds:.2f}s {reg.stages}")
    assert min(after) > 0.75 and min(after) > max(before) + 0.2


def test_deformable_stage_is_kept_only_when_it_improves_the_metric():
    fixed_img, _, fixed_aff = synthetic_volume(1)
    mov_img, _, mov_aff = _warped(2)
    cfg = RegistrationConfig(grid_mm=3.0, search_mm=6.0, affine_iterations=30, bspline_mm=40.0,
                             bspline_iterations=5)
    reg = register(prepare(to_sitk(fixed_img, fixed_aff), "MR", cfg), prepare(to_sitk(mov_img, mov_aff), "MR", cfg),
                   cfg)
    assert reg.metric <= reg.affine_metric and "deform_s" in reg.stages


def test_modality_guess():
    ct = np.full((20, 20, 10), -1000.0)
    ct[5:15, 5:15] = 40.0
    assert guess_modality(ct) == "CT"
    assert guess_modality(np.random.default_rng(0).uniform(0, 800, (20, 20, 10))) == "MR"


def test_fusion_vote_consensus_and_agreement():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    c = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = True
    b[3:7, 2:6, 2:6] = True
    c[2:6, 2:6, 2:6] = True
    f = fuse([a, b, c])
    assert f.atlases == 3 and f.probability.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(f.consensus, a & b & c)
    np.testing.assert_array_equal(f.mask, (a.astype(int) + b + c) >= 2)
    assert f.agreement == pytest.approx(np.mean([dice(a, b), dice(a, c), dice(b, c)]))
    assert f.disagreement == pytest.approx(1 - f.agreement)
    single = fuse([a])
    assert single.agreement is None and single.disagreement is None
    np.testing.assert_array_equal(single.mask, a)
    assert pairwise_agreement([np.zeros_like(a), np.zeros_like(a)]) == 1.0
    weighted = fuse([a, b], weights=[3, 1])  # a alone carries 75 % of the vote
    np.testing.assert_array_equal(weighted.mask, a)
    with pytest.raises(ValueError):
        fuse([a, b], weights=[1])
    with pytest.raises(ValueError):
        fuse([])


def test_prompts_from_a_fused_mask():
    shape = (40, 40, 20)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[8:24, 10:26, 4:14] = True
    b[12:28, 10:26, 4:14] = True
    fused = fuse([a, b])
    spacing = (1.0, 1.0, 2.0)
    p = prompts_from_fused(fused, spacing, n_fg=2, n_bg=2, margin=1)
    assert p.box == [7, 28, 9, 26, 3, 14]
    fg = p.points[p.point_labels == 1]
    bg = p.points[p.point_labels == 0]
    assert len(fg) == 2 and all(fused.consensus[tuple(q)] for q in fg)
    assert len(bg) <= 2 and all(fused.probability[tuple(q)] == 0 for q in bg)
    box = np.asarray(p.box)
    assert np.all((p.points >= box[0::2]) & (p.points <= box[1::2]))
    assert p.summary()["foreground"] == 2
    empty = prompts_from_fused(fuse([np.zeros(shape, bool)]), spacing)
    assert empty.empty and empty.box is None


def test_deepest_points_spread_over_the_region():
    region = np.zeros((60, 20, 20), bool)
    region[5:25, 5:15, 5:15] = True
    region[35:55, 5:15, 5:15] = True
    region[30, 10, 10] = True  # a lone voxel: depth 1 mm, below the minimum depth asked
    pts = deepest_points(region, (1.0, 1.0, 1.0), 8, min_depth_mm=2.0)
    assert 2 <= len(pts) < 8 and all(region[tuple(p)] for p in pts) and [30, 10, 10] not in pts.tolist()
    gaps = [np.linalg.norm(p - q) for n, p in enumerate(pts) for q in pts[n + 1:]]
    assert min(gaps) > 10.0  # each click excludes a ball of at least 10 mm around it
    assert len(deepest_points(np.zeros((5, 5, 5), bool), (1, 1, 1), 3)) == 0


@pytest.fixture()
def atlas_folder(tmp_path):
    """A dataset.json folder with two warped copies of the synthetic study as atlases."""
    import nibabel as nib

    entries = []
    for n, seed in enumerate((2, 3)):
        img, lab, aff = _warped(seed) if n == 0 else synthetic_volume(seed, shift=(-2, 2, 0))
        os.makedirs(tmp_path / "imagesTr", exist_ok=True)
        os.makedirs(tmp_path / "labelsTr", exist_ok=True)
        nib.save(nib.Nifti1Image(img, aff), str(tmp_path / "imagesTr" / f"a{n}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(tmp_path / "labelsTr" / f"a{n}.nii.gz"))
        labels = {"1": "blob_a", "2": "blob_b"} if n == 0 else {"1": "blob_a"}
        entries.append({"image": f"imagesTr/a{n}.nii.gz", "label": f"labelsTr/a{n}.nii.gz", "modality": "MR",
                        "labels": labels})
    with open(tmp_path / "dataset.json", "w") as f:
        json.dump({"training": entries}, f)
    return str(tmp_path)


class RecordingEngine:
    """Stands in for EnsamEngine: answers the box's inside, records the prompts it was given."""

    def __init__(self):
        self.calls = []

    def segment_step(self, image, affine, points=None, point_labels=None, boxes=None, prev_mask=None, image_key=None,
                     prev_info=None):
        self.calls.append({"points": points, "point_labels": point_labels, "boxes": boxes})
        out = np.zeros(np.shape(image), np.uint8)
        b = boxes[0]
        out[b[0] + 1:b[1], b[2] + 1:b[3], b[4] + 1:b[5]] = 1
        return out, {}


def test_segment_by_example_registers_each_atlas_once_and_prompts_the_engine(atlas_folder):
    lib = AtlasLibrary.from_dataset(atlas_folder, FAST)
    assert {a.key for a in lib.atlases} == {"a0", "a1"} and lib.names() == {"blob_a": ["a0", "a1"], "blob_b": ["a0"]}
    engine = RecordingEngine()
    seg = SegmentByExample(lib, engine)
    img, lab, aff = synthetic_volume(1)
    logs = []
    res = seg.segment(img, aff, ["blob_a", "blob_b", "liver"], image_key="vol", log=logs.append)
    assert sum("registered" in m for m in logs) == 2  # one registration per atlas for all names
    assert res.missing == {"liver": "no atlas carries this structure"}
    a, b = res.structures["blob_a"], res.structures["blob_b"]
    assert a.atlases == ["a0", "a1"] and b.atlases == ["a0"] and a.source == "atlas+ensam"
    assert a.agreement is not None and 0.6 < a.agreement <= 1.0 and b.agreement is None
    assert dice(a.atlas_mask, lab == 1) > 0.7 and dice(b.atlas_mask, lab == 2) > 0.7
    assert 0.0 <= a.uncertainty <= 1.0 and 0.0 <= b.uncertainty <= 1.0
    assert len(engine.calls) == 2 and all(c["boxes"] and np.any(c["point_labels"] == 1) for c in engine.calls)
    # the same image again: transforms come from the cache, no new registration; atlas-only names skip ensam
    logs.clear()
    again = seg.segment(img, aff, ["blob_a"], image_key="vol", log=logs.append, atlas_only=["blob_a"])
    assert not any("registered" in m for m in logs) and len(engine.calls) == 2
    assert again.structures["blob_a"].source == "atlas"
    np.testing.assert_array_equal(again.structures["blob_a"].mask, a.atlas_mask)


def test_atlas_selection_prefers_same_modality_and_more_names(atlas_folder):
    lib = AtlasLibrary.from_dataset(atlas_folder, FAST)
    lib.atlases[1].modality = "CT"
    seg = SegmentByExample(lib, None, max_atlases=1)
    assert [a.key for a in seg.select(["blob_a"], "CT")] == ["a1"]
    assert [a.key for a in seg.select(["blob_a", "blob_b"], "MR")] == ["a0"]
    assert seg.select(["liver"], "MR") == []


def test_missing_atlas_folder_gives_an_empty_library(tmp_path):
    assert AtlasLibrary.from_dataset(str(tmp_path / "nothing")).atlases == []


def test_evaluation_cli_rows_and_validation(atlas_folder, tmp_path):
    from lib.atlas.evaluate import evaluate, markdown, validation

    res = evaluate(atlas_folder, atlas_folder, None, threads=1, min_voxels=10, log=lambda m: None)
    assert {r["image"] for r in res["pairs"]} == {"a0", "a1"}
    val = validation(res)
    assert set(val) <= {"blob_a", "blob_b"} and all(set(v) == {"atlas+ensam", "atlas"} for v in val.values())
    assert "atlas-only DSC" in markdown(res)


def test_an_unreadable_atlas_is_skipped_not_fatal(atlas_folder):
    lib = AtlasLibrary.from_dataset(atlas_folder, FAST)
    os.remove(lib.atlases[0].label_path)
    img, lab, aff = synthetic_volume(1)
    logs = []
    res = SegmentByExample(lib, None).segment(img, aff, ["blob_a", "blob_b"], image_key="v", log=logs.append)
    assert any("a0: skipped (FileNotFoundError" in m for m in logs)
    assert res.structures["blob_a"].atlases == ["a1"]
    assert res.missing == {"blob_b": "the atlases that carry this structure could not be registered"}


class CornerEngine(RecordingEngine):
    """Answers only a small cube at the box's low corner: most of what the atlases agree on is missed."""

    def segment_step(self, image, affine, points=None, point_labels=None, boxes=None, prev_mask=None, image_key=None,
                     prev_info=None):
        self.calls.append({"points": points, "point_labels": point_labels, "prev_mask": prev_mask})
        out = np.zeros(np.shape(image), np.uint8)
        b = boxes[0]
        out[b[0]:b[0] + 2, b[2]:b[2] + 2, b[4]:b[4] + 2] = 1
        return out, {}


def test_corrective_click_where_the_atlases_agree_and_ensam_misses(atlas_folder):
    lib = AtlasLibrary.from_dataset(atlas_folder, FAST)
    engine = CornerEngine()
    seg = SegmentByExample(lib, engine, corrections=1)
    img, lab, aff = synthetic_volume(1)
    res = seg.segment(img, aff, ["blob_a"], image_key="c", log=lambda m: None)
    assert len(engine.calls) == 2
    first, second = engine.calls
    assert len(second["points"]) == len(first["points"]) + 1 and second["point_labels"][-1] == 1
    assert second["prev_mask"] is not None
    s = res.structures["blob_a"]
    new = tuple(second["points"][-1])
    assert s.atlas_mask[new] and lab[new] == 1  # the click lies where the atlases agree, inside the true blob
    assert s.prompts["foreground"] == first["point_labels"].tolist().count(1) + 1
