"""The labelling-loop simulator (lib.experiments.labelling_loop, issue 29): its pieces without a server, then one
whole tiny loop through a real server (3 synthetic instances, 1 fine-tuning round of a few steps)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

SHAPE = (64, 48, 32)
SPACING = (1.5, 1.2, 2.0)
# three instances of the family "blob" (label values 1..3) and one other structure (4) for the forgetting probe
BLOBS = {1: ((14, 14, 10), (6, 5, 4)), 2: ((44, 16, 20), (7, 6, 4)), 3: ((30, 34, 14), (5, 7, 5)),
         4: ((50, 36, 24), (6, 5, 4))}


def _volume(seed: int):
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    img = rng.normal(0.0, 30.0, SHAPE).astype(np.float32) - 50.0
    lab = np.zeros(SHAPE, dtype=np.uint8)
    for value, (c, r) in BLOBS.items():
        inside = sum(((g - c[a]) / r[a]) ** 2 for a, g in enumerate((ii, jj, kk))) <= 1.0
        # only the upper part of each instance stands out: the box alone cannot reach DSC 0.90, clicks are needed
        img[inside & (kk >= c[2] - 1)] += 700.0 + 50 * value
        lab[inside] = value
    affine = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [40.0, -10.0, 5.0]
    return img, lab, affine


def _dataset(folder, key: str, seed: int, names: dict) -> str:
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labels"), exist_ok=True)
    img, lab, aff = _volume(seed)
    nib.save(nib.Nifti1Image(img, aff), os.path.join(folder, "images", "vol.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), os.path.join(folder, "labels", "vol.nii.gz"))
    entry = {"image": "images/vol.nii.gz", "label": "labels/vol.nii.gz", "modality": "CT",
             "labels": {str(k): v for k, v in names.items()}}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({key: [entry]}, f)
    return str(folder)


# ---------------------------------------------------------------------------------------------------- pieces
def test_instances_are_cropped_with_their_own_reference(tmp_path):
    from lib.experiments.labelling_loop import build_instances, crop_bounds, find_instances, select

    data = _dataset(tmp_path / "train", "training", 1, {1: "blob_1", 2: "blob_2", 3: "blob_3", 4: "other"})
    found = find_instances(data, r"^blob_\d+$", "CT", min_voxels=10)
    assert [d["value"] for d in found] == [1, 2, 3]  # "other" is not of the family
    assert find_instances(data, r"^blob_\d+$", "MR") == []
    assert select(found, 2, 0) == select(found, 2, 0) and len(select(found, 2, 0)) == 2
    insts = build_instances(found, str(tmp_path / "img"), str(tmp_path / "gt"), margin_mm=6.0)
    img, lab, aff = _volume(1)
    for inst in insts:
        crop = nib.load(os.path.join(tmp_path, "img", inst.image_id + ".nii.gz"))
        gt = np.asarray(nib.load(inst.gt_path).dataobj)
        c = inst.crop
        # the crop is the scan's voxels, placed where they were in the world, with only this instance as reference
        assert np.allclose(np.asarray(crop.dataobj), img[c[0]:c[1], c[2]:c[3], c[4]:c[5]])
        assert np.allclose(crop.affine[:3, 3], (aff @ [c[0], c[2], c[4], 1])[:3])
        assert gt.sum() == (lab == inst.value).sum() == inst.voxels
        assert np.array_equal(gt != 0, lab[c[0]:c[1], c[2]:c[3], c[4]:c[5]] == inst.value)
    b = crop_bounds(lab == 1, SPACING, 6.0)
    assert b[0] == 14 - 6 - 4 and b[1] == 14 + 6 + 1 + 4  # 6 mm at 1.5 mm = 4 voxels per side


def test_summary_counts_the_click_saving_after_n_labels():
    from lib.experiments.labelling_loop import LoopConfig, forgetting, summarize

    steps = [{"image_id": f"i{n}", "labels_so_far": n, "clicks": c, "shipped_clicks": s, "round": r,
              "reached": c < 10, "final_dsc": 0.9 if c < 10 else 0.8, "box_dsc": 0.5,
              "click_saving": None if s == 0 else 1 - c / s}
             for n, (c, s, r) in enumerate([(4, 4, 0), (6, 6, 0), (2, 4, 1), (3, 6, 1), (1, 5, 2), (0, 0, 2)])]
    rounds = [{"labels_so_far": 0, "ensam_seg_mean": 0.2, "spearman": {"rho": 0.1}},
              {"labels_so_far": 2, "ensam_seg_mean": 0.5, "spearman": {"rho": 0.6}, "train": {"minutes": 1.0},
               "forgetting": {"max": 0.01}},
              {"labels_so_far": 4, "ensam_seg_mean": 0.8, "spearman": {"rho": None}, "train": {"minutes": 2.0},
               "forgetting": {"max": 0.03}}]
    baseline = {f"i{n}": {"final_dsc": 0.7, "box_dsc": 0.4, "reached": n == 5} for n in range(6)}
    s = summarize({"orders": {"first": {"steps": steps, "rounds": rounds}}, "baseline": baseline},
                  LoopConfig(saving_after=4))["first"]
    assert s["instances_after"] == 2 and s["click_saving_after"] == pytest.approx(1 - 1 / 5)
    assert s["reached_after"] == 2 and s["shipped_reached_after"] == 1
    assert s["final_dsc_after"] == pytest.approx(0.9) and s["shipped_final_dsc_after"] == pytest.approx(0.7)
    assert s["labels_to_30pct_saving"] == 2 and s["ensam_seg_mean_after"] == 0.8
    assert s["forgetting_max_per_round"] == [0.01, 0.03] and s["targets"]["forgetting_at_most_0.02"] is False
    assert s["targets"]["spearman_at_least_0.5"] is False  # round 0's rho 0.1
    f = forgetting({"averages": {"a": 0.8, "b": 0.5}}, {"averages": {"a": 0.7, "b": 0.6}})
    assert f["drop"] == {"a": pytest.approx(0.1), "b": pytest.approx(-0.1)} and f["max"] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------- whole loop
def test_tiny_loop_through_the_server(tmp_path):
    """3 instances, order ``first``, one fine-tuning round (2 steps) after 2 labels: every step is in the JSON with
    consistent counts, the labels are in the datastore, and the last instance was segmented with the new weights."""
    from lib.experiments.labelling_loop import LoopConfig, main

    data = _dataset(tmp_path / "train", "training", 1, {1: "blob_1", 2: "blob_2", 3: "blob_3"})
    evald = _dataset(tmp_path / "eval", "testing", 7, {4: "other"})
    out = tmp_path / "loop.json"
    work = tmp_path / "work"
    result = main(["--family", "blobs", "--label", "blob", "--pattern", r"^blob_\d+$", "--modality", "CT",
                   "--data", data, "--eval-data", evald, "--eval-structures", "vol:other", "--instances", "3",
                   "--min-voxels", "10", "--margin-mm", "6", "--orders", "first", "--every", "2", "--rounds", "1",
                   "--train-seconds", "20", "--train-steps", "2", "--threads", "1", "--work", str(work),
                   "--out", str(out), "--quiet"])
    on_disk = json.loads(out.read_text())
    assert on_disk["summary"] == json.loads(json.dumps(result["summary"]))
    cfg = on_disk["config"]
    ids = [i["image_id"] for i in on_disk["instances"]]
    assert len(ids) == 3 and set(on_disk["baseline"]) == set(ids)
    o = on_disk["orders"]["first"]
    assert o["sequence"] == sorted(ids)  # first = sorted ids, each once
    assert [s["labels_so_far"] for s in o["steps"]] == [0, 1, 2]
    for s in list(o["steps"]) + list(on_disk["baseline"].values()):
        assert 0 <= s["clicks"] <= cfg["max_clicks"] == 10
        assert len(s["dsc"]) == s["clicks"] + 1 == len(s["seconds"]) and len(s["points"]) == s["clicks"]
        assert all(0.0 <= d <= 1.0 for d in s["dsc"]) and s["final_dsc"] == s["dsc"][-1]
        assert s["reached"] == (s["dsc"][-1] >= 0.90)
        assert s["reached"] or s["clicks"] == 10  # it stops at the target or at 10 clicks, nowhere else
    for s in o["steps"]:
        assert s["saved"] and s["shipped_clicks"] == on_disk["baseline"][s["image_id"]]["clicks"]
    # rounds: before any label, then after the fine-tuning of 2 labels
    assert [r["round"] for r in o["rounds"]] == [0, 1] and [r["labels_so_far"] for r in o["rounds"]] == [0, 2]
    assert [s["round"] for s in o["steps"]] == [0, 0, 1]
    assert o["steps"][0]["reused_baseline"] and not o["steps"][2]["reused_baseline"]
    for r in o["rounds"]:
        assert set(r["ensam_seg"]) == set(r["unlabelled"]) and len(r["unlabelled"]) == 3 - r["labels_so_far"]
        for v in r["ensam_seg"].values():
            assert v["dsc"] is None or 0.0 <= v["dsc"] <= 1.0
        assert set(r["uncertainty"]) == set(r["unlabelled"])
    train = o["rounds"][1]["train"]
    assert train["status"] == "DONE" and train["new_weights"] and 0 < train["steps"] <= 2
    assert train["info_after"]["status"] == "DONE" and train["info_after"]["weights"] == "ensam.pt"
    assert train["info_after"]["start_ts"] != train["info_before"]["start_ts"]
    assert train["minutes"] >= 0 and train["wall_minutes"] > 0
    # the server answered the next instance with the published weights (its infer answer says so)
    assert o["steps"][0]["weights"]["weights"] == "pretrained_ensam.pt"
    assert o["steps"][2]["weights"]["weights"] == "ensam.pt"
    assert o["steps"][2]["weights"]["weights_mtime_ns"] == train["weights_mtime_ns_after"]
    # forgetting: the probe's averages before / after, and their change
    drop = o["rounds"][1]["forgetting"]["drop"]
    assert set(drop) == set(on_disk["forgetting_probe"]["shipped"]["averages"]) and "overall/box_dsc" in drop
    assert all(-1.0 <= v <= 1.0 for v in drop.values())
    # the labels are in the datastore, as GET /datastore reported them and as its file holds them
    assert o["datastore_final_labels"] == sorted(ids)
    with open(work / "order_first" / "studies" / "datastore_v2.json") as f:
        objects = json.load(f)["objects"]
    for image_id in ids:
        info = objects[image_id]["labels"]["final"]
        assert info["info"]["label_info"] == [{"name": "blob", "idx": 1}]
        saved = np.asarray(nib.load(work / "order_first" / "studies" / "labels" / "final" / f"{image_id}.nii.gz")
                           .dataobj)
        ref = np.asarray(nib.load(work / "instances" / "gt" / f"{image_id}.nii.gz").dataobj)
        assert np.array_equal(saved, ref)
    s = on_disk["summary"]["first"]
    assert s["train_minutes_per_round"] == [train["minutes"]] and len(s["ensam_seg_mean_per_round"]) == 2
    for png in on_disk["plots"]:
        assert (tmp_path / png).stat().st_size > 1000
    # a result can be re-summarised and re-plotted without a run
    os.remove(tmp_path / on_disk["plots"][0])
    again = main(["--from-json", str(out)])
    assert again["summary"] == on_disk["summary"] and (tmp_path / on_disk["plots"][0]).exists()
