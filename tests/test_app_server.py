"""The ensam MONAI Label app over HTTP: a real server process (see ``ensam_server`` in conftest.py), real NIfTI
files, requests as 3D Slicer and OHIF send them, and monailabel's own client for some calls.

Order matters only at the end: training, then active learning (it needs a labelled image)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from monailabel.client import MONAILabelClient

from conftest import BLOBS

TIMEOUT = 120


def _infer(server, model, image, params, output="all", **kw):
    return requests.post(
        f"{server.url}/infer/{model}", params={"image": image, "output": output},
        data={"params": json.dumps(params)}, timeout=kw.get("timeout", TIMEOUT),
    )


def _mask_from_multipart(resp):
    """(mask array, affine, params) from an ``output=all`` multipart answer."""
    from lib.io.infer_answer import read_answer

    vol, params = read_answer(resp.content, resp.headers.get("content-type", ""))
    return np.asarray(vol.array), vol.affine, params


def _trained(server) -> bool:
    return any(f.startswith("pretrained_ensam.pt") or f == "ensam.pt"
               for f in os.listdir(os.path.join(server.app_dir, "model")))


def _datastore_file(server) -> dict:
    with open(os.path.join(server.studies, "datastore_v2.json")) as f:
        return json.load(f)


def _wait_task(server, path, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = requests.get(f"{server.url}{path}", timeout=30)
        if r.status_code == 200 and r.json().get("status") in ("DONE", "ERROR", "STOPPED"):
            return r.json()
        time.sleep(1.0)
    raise AssertionError(f"{path} did not finish in {timeout}s:\n{server.log_tail()}")


# ---------------------------------------------------------------------------------------------------- info
def test_info_lists_the_tasks(ensam_server):
    info = MONAILabelClient(ensam_server.url).info()
    models = info["models"]
    assert models["ensam"]["type"] == "deepgrow" and models["ensam"]["dimension"] == 3
    assert models["ensam_seg"]["type"] == "segmentation"
    assert set(BLOBS) <= set(models["ensam_seg"]["labels"]) and models["ensam_seg"]["labels"]["liver"] == 5
    assert "ensam" in info["trainers"]
    assert {"first", "random", "novelty", "uncertainty"} <= set(info["strategies"])
    assert {"novelty", "uncertainty"} <= set(info["scoring"])
    # no MLflow option offered: a Slicer "Train" click sends the first value of every list
    assert "tracking" not in info["trainers"]["ensam"]["config"]


# ---------------------------------------------------------------------------------------------------- infer
def test_click_result_on_original_grid(ensam_server, tmp_path):
    img, _, aff = ensam_server.images["vol0"]
    client = MONAILabelClient(ensam_server.url, tmpdir=str(tmp_path), client_id="slicer-1")
    v = [14, 12, 8]  # centre of blob_a
    out, params = client.infer("ensam", "vol0", {"foreground": [v], "background": [], "label": "blob_a",
                                                  "reset_state": True})
    res = nib.load(out)
    mask = np.asarray(res.dataobj)
    assert mask.shape == img.shape and np.allclose(res.affine, aff)
    assert set(np.unique(mask)) <= {0, 1}
    assert params["label_names"] == {"blob_a": 1} and params["prompts"]["foreground"] == 1
    # the clicked voxel is in the mask: with trained weights because the model learned it, without them because
    # of the network's prompt prior (a positive logit at a foreground click); an axis mix-up anywhere between the
    # request, the engine and the written file would miss this off-centre, anisotropic, flipped-axis voxel
    assert mask[tuple(v)] == 1, f"the clicked voxel {v} is not in the mask ({int(mask.sum())} voxels)"
    # nothing outside the region the engine looked at
    roi = params.get("engine", {})
    if "roi_start" in roi:
        lo = np.maximum(roi["roi_start"], 0)
        hi = np.asarray(roi["roi_start"]) + np.asarray(roi["roi_size"])
        assert all(lo[a] <= v[a] < hi[a] for a in range(3)), "the click is outside the engine's region"
        outside = mask.copy()
        outside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 0
        assert outside.sum() == 0


def test_roi_reversed_pairs_and_clicks_together(ensam_server):
    img, *_ = ensam_server.images["vol0"]
    roi = [40, 27, 20, 34, 19, 11]  # Slicer may send a pair reversed
    r = _infer(ensam_server, "ensam", "vol0", {"roi": roi, "label": "blob_b", "client_id": "t-roi",
                                                "reset_state": True})
    assert r.status_code == 200, r.text
    mask, _, params = _mask_from_multipart(r)
    assert mask.shape == img.shape and params["prompts"] == {"foreground": 0, "background": 0, "boxes": 1}
    r = _infer(ensam_server, "ensam", "vol0", {"roi": roi, "foreground": [[34, 27, 15]], "background": [[28, 21, 12]],
                                                "label": "blob_b", "client_id": "t-roi"})
    assert r.status_code == 200, r.text
    mask2, _, params2 = _mask_from_multipart(r)
    assert params2["prompts"] == {"foreground": 1, "background": 1, "boxes": 1} and params2["previous_mask"]
    if _trained(ensam_server):
        assert mask2[34, 27, 15] == 1 and mask2[28, 21, 12] == 0


def test_several_boxes_in_one_call(ensam_server):
    img, *_ = ensam_server.images["vol1"]
    boxes = [[9, 25, 4, 16, 5, 14], [33, 45, 18, 30, 12, 20]]
    r = _infer(ensam_server, "ensam", "vol1", {"boxes": boxes, "label": "both", "reset_state": True})
    assert r.status_code == 200, r.text
    mask, _, params = _mask_from_multipart(r)
    assert mask.shape == img.shape and params["prompts"]["boxes"] == 2


def test_ohif_points_nrrd_uint8(ensam_server):
    """What OHIF v3 sends: points + point_labels (vista style) or foreground/background, always .nrrd/uint8."""
    import SimpleITK as sitk

    img, *_ = ensam_server.images["vol2"]
    r = _infer(ensam_server, "ensam", "vol2", {
        "points": [[12, 15, 10], [30, 30, 5]], "point_labels": [1, 0], "result_extension": ".nrrd",
        "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False,
    }, output="image")
    assert r.status_code == 200, r.text
    with tempfile.NamedTemporaryFile(suffix=".nrrd", delete=False) as f:
        f.write(r.content)
    try:
        seg = sitk.ReadImage(f.name)
        ref = sitk.ReadImage(os.path.join(ensam_server.studies, "vol2.nii.gz"))
        assert seg.GetPixelID() == sitk.sitkUInt8 and seg.GetSize() == ref.GetSize()
        assert np.allclose(seg.GetOrigin(), ref.GetOrigin()) and np.allclose(seg.GetDirection(), ref.GetDirection())
        assert np.allclose(seg.GetSpacing(), ref.GetSpacing())
    finally:
        os.remove(f.name)


@pytest.mark.parametrize("params, status, words", [
    ({"foreground": [[48, 10, 10]]}, 422, "outside the image"),
    ({"foreground": [[-3, 10, 10]]}, 422, "outside the image"),
    ({"roi": [1, 2, 3, 4]}, 400, "roi"),
    ({"roi": [1, 2, "x", 4, 5, 6]}, 400, "roi"),
    ({"foreground": [], "background": [], "roi": []}, 400, "no prompt"),
])
def test_bad_prompts_are_4xx_with_a_clear_message(ensam_server, params, status, words):
    r = _infer(ensam_server, "ensam", "vol0", dict(params, client_id="bad", label="blob_a"))
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_bad_requests_change_nothing_and_undo(ensam_server):
    base = {"client_id": "undo-test", "label": "blob_a"}
    r1 = _infer(ensam_server, "ensam", "vol3", dict(base, foreground=[[15, 13, 7]], reset_state=True))
    m1, _, p1 = _mask_from_multipart(r1)
    assert p1["session"]["step"] == 1 and not p1["previous_mask"]
    assert _infer(ensam_server, "ensam", "vol3", dict(base, foreground=[[15, 13, 99]])).status_code == 422
    r2 = _infer(ensam_server, "ensam", "vol3", dict(base, foreground=[[15, 13, 7]], background=[[20, 20, 10]]))
    _, _, p2 = _mask_from_multipart(r2)
    assert p2["session"]["step"] == 2 and p2["previous_mask"]  # the bad request did not add a step
    r3 = _infer(ensam_server, "ensam", "vol3", dict(base, undo=True))
    m3, _, p3 = _mask_from_multipart(r3)
    assert p3["session"]["step"] == 1 and np.array_equal(m3, m1)
    r4 = _infer(ensam_server, "ensam", "vol3", dict(base, undo=True))
    m4, _, _ = _mask_from_multipart(r4)
    assert m4.sum() == 0
    r5 = _infer(ensam_server, "ensam", "vol3", dict(base, undo=True))
    assert r5.status_code == 409 and "nothing to undo" in r5.json()["detail"]
    assert _infer(ensam_server, "nope", "vol3", {"foreground": [[1, 1, 1]]}).status_code == 404
    r = _infer(ensam_server, "ensam", "missing", {"foreground": [[1, 1, 1]]})
    assert r.status_code == 404 and "'missing' is not in the datastore" in r.json()["detail"]


def test_repeated_clicks_reuse_the_encoding(ensam_server):
    """vol4 is used by no other infer test: the first click encodes it, the repeats find the encoding cached."""
    p = {"foreground": [[34, 29, 16]], "label": "blob_b", "client_id": "cache", "reset_state": True}
    times, hits = [], []
    for n in range(4):
        q = dict(p, background=[[27, 22, 12]]) if n == 3 else p  # a refinement click inside the same region
        t = time.perf_counter()
        r = _infer(ensam_server, "ensam", "vol4", q, output="json")
        times.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
        hits.append(r.json().get("engine", {}).get("cache_hits", 0))
    print(f"\nclick latencies (s): cold {times[0]:.3f}, repeats {times[1]:.3f} {times[2]:.3f}, "
          f"refinement {times[3]:.3f}; cache hits {hits}; speed-up {times[0] / np.median(times[1:3]):.1f}x")
    assert hits[0] == 0 and hits[1] >= 1 and hits[2] >= 1


def test_info_answers_while_an_inference_runs(ensam_server):
    """The infer route runs in a thread pool: /info must not wait for a long inference."""
    boxes = [[i, i + 20, j, j + 18, k, k + 8] for i in (0, 27) for j in (0, 20) for k in (0, 8, 15)]  # 12 objects
    done = {}

    def slow():
        t = time.perf_counter()
        done["r"] = _infer(ensam_server, "ensam", "vol1", {"boxes": boxes, "label": "many", "client_id": "slow"},
                           output="json", timeout=300)
        done["t"] = time.perf_counter() - t

    th = threading.Thread(target=slow)
    th.start()
    time.sleep(0.2)
    lat = []
    while th.is_alive() and len(lat) < 5:
        t = time.perf_counter()
        assert requests.get(f"{ensam_server.url}/info/", timeout=30).status_code == 200
        lat.append(time.perf_counter() - t)
        time.sleep(0.2)
    th.join()
    assert done["r"].status_code == 200, done["r"].text
    print(f"\n/info latencies during a {done['t']:.2f}s inference: {[round(x, 3) for x in lat]}")
    assert lat, f"the inference finished too fast ({done['t']:.2f}s) to measure /info during it"
    assert max(lat) < min(1.0, done["t"])


# ---------------------------------------------------------------------------------------------------- batch
def test_batch_infer_prompt_free_with_progress(ensam_server):
    r = requests.post(f"{ensam_server.url}/batch/infer/ensam_seg", params={"images": "all"},
                      json={"max_workers": 1, "labels": "blob_a"}, timeout=60)
    assert r.status_code == 200, r.text
    task = _wait_task(ensam_server, "/batch/infer/")
    assert task["status"] == "DONE", task
    lines = "\n".join(task["details"])
    n = len(ensam_server.images)
    assert f"ensam batch: {n}/{n}" in lines and f"finished {n} ok, 0 failed" in lines, lines
    # written by the batch process; the server re-reads the datastore file
    ds = requests.get(f"{ensam_server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert all("original" in ds["objects"][i]["labels"] for i in ensam_server.images)
    for i in ensam_server.images:
        assert os.path.exists(os.path.join(ensam_server.studies, "labels", "original", f"{i}.nii.gz"))


def test_batch_infer_with_a_prompt_manifest(ensam_server):
    manifest = {"vol0": [{"label": "blob_a", "boxes": [[7, 21, 6, 18, 4, 12]]},
                         {"label": "blob_b", "foreground": [[34, 27, 15]]}],
                "vol2": {"label": "blob_a", "points": [[12, 15, 10]], "point_labels": [1]}}
    # run_sync: the answer is the per-image result (the background path is covered by the test above)
    r = requests.post(f"{ensam_server.url}/batch/infer/ensam", params={"images": "all", "run_sync": "true"},
                      json={"manifest": manifest, "label_tag": "ensam_batch"}, timeout=300)
    assert r.status_code == 200, r.text
    res = r.json()
    assert set(res) == {"vol0", "vol2"} and res["vol0"]["label_names"] == {"blob_a": 1, "blob_b": 2}, res
    info = _datastore_file(ensam_server)["objects"]["vol0"]["labels"]["ensam_batch"]["info"]
    assert info["params"]["label_names"] == {"blob_a": 1, "blob_b": 2}
    img = nib.load(os.path.join(ensam_server.studies, "labels", "ensam_batch", "vol0.nii.gz"))
    assert img.shape == ensam_server.images["vol0"][0].shape
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2}


# ---------------------------------------------------------------------------------------------------- train
def _save_final_label(server, image_id):
    _, lab, aff = server.images[image_id]
    with tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False) as f:
        path = f.name
    nib.save(nib.Nifti1Image(lab, aff), path)
    try:
        client = MONAILabelClient(server.url, client_id="slicer-1")
        info = [{"name": n, "idx": i + 1} for i, n in enumerate(BLOBS)]  # what Slicer saves
        res = client.save_label(image_id, path, tag="final", params={"label_info": info, "model": "ensam"})
    finally:
        os.remove(path)
    assert res["image"] == image_id


@pytest.mark.parametrize("body, words", [
    ({"max_seconds": "ten"}, "max_seconds"),
    ({"val_split": 1.5}, "val_split"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"rehearsal": 2}, "rehearsal"),
    ({"cpu_processes": 64}, "cpu_processes"),
    ({"concept": "flase"}, "concept"),  # a boolean typo is a 400 as in an infer request
    ({"start_from": "yesterday"}, "start_from"),
    ({"bf16": "half"}, "bf16"),
    ({"reference_tolerance": 2}, "reference_tolerance"),
])
def test_bad_train_requests_are_refused_before_anything_starts(ensam_server, body, words):
    before = requests.get(f"{ensam_server.url}/train/", params={"all": True}, timeout=30)
    n_before = len(before.json()) if before.status_code == 200 else 0
    r = requests.post(f"{ensam_server.url}/train/ensam", json=body, timeout=60)
    assert r.status_code == 400 and words in r.json()["detail"], r.text
    after = requests.get(f"{ensam_server.url}/train/", params={"all": True}, timeout=30)
    assert (len(after.json()) if after.status_code == 200 else 0) == n_before  # no training task was started
    r = requests.post(f"{ensam_server.url}/train/nope", json={}, timeout=60)
    assert r.status_code == 404 and "ensam" in r.json()["detail"]


def test_short_cpu_training_then_inference_uses_the_new_weights(ensam_server):
    _save_final_label(ensam_server, "vol0")
    _save_final_label(ensam_server, "vol1")
    r = requests.post(f"{ensam_server.url}/train/ensam", json={
        "device": "cpu", "max_seconds": 90, "max_steps": 2, "val_every": 2, "val_split": 0.5, "labels": "blob_a",
    }, timeout=60)
    assert r.status_code == 200, r.text
    task = _wait_task(ensam_server, "/train/", timeout=400)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    print("\n".join(line[-160:] for line in task["details"][-6:]))
    assert os.path.exists(os.path.join(ensam_server.app_dir, "model", "ensam.pt"))
    stats = requests.get(f"{ensam_server.url}/info/", timeout=30).json()["train_stats"]["ensam"]
    assert stats["status"] == "DONE" and stats["train_images"] and stats["val_images"], stats
    assert set(stats["label_names"]) == {"blob_a"} and 0 < stats["steps"] <= 2
    assert "val_box_dsc" in stats["val_best"] and stats["best_metric"] is not None
    # the validation of the fine-tuned label is recorded before and after, and the published weights are not worse
    before, best = stats["val_before"], stats["val_best"]
    assert 0.0 <= before["val_box_dsc"] <= 1.0 and best["score"] >= before["score"], (before, best)
    assert stats["best_metric_before"] == before["score"] and stats["best_metric"] == best["score"]
    art = torch.load(os.path.join(ensam_server.app_dir, "model", "ensam.pt"), weights_only=True)
    assert art["format"] == "ensam-weights/1"  # one artefact: weights, network, contract and vocabulary
    shipped = torch.load(os.path.join(ensam_server.app_dir, "model", "pretrained_ensam.pt"), weights_only=True)
    changed = [k for k, v in art["state_dict"].items()
               if k in shipped["state_dict"] and not torch.equal(v.float(), shipped["state_dict"][k].float())]
    # the optimiser moved the weights: the network after training scores differently from before (a training
    # that steps nothing validates identically); the published ones differ from the shipped ones unless the best
    # validation was the starting point, which is then what is published
    assert stats["val_after"]["score"] != before["score"], (stats["val_after"], before)
    assert changed or (stats["restored_best"] and best["score"] == before["score"]), (changed, stats)
    assert art["meta"]["val_best"]["score"] == best["score"]
    assert set(BLOBS) <= set(art["meta"]["vocabulary"]) and "contract" in art["meta"] and art["meta"]["network"]
    r = _infer(ensam_server, "ensam", "vol2", {"foreground": [[14, 12, 8]], "reset_state": True}, output="json")
    assert r.status_code == 200 and r.json()["weights"] == "ensam.pt"


def test_data_parallel_training_over_two_processes(ensam_server):
    """The multi-GPU path (torch.distributed, one process per device) run on CPU over gloo: ``cpu_processes``."""
    for image_id in ("vol0", "vol1"):
        if not requests.get(f"{ensam_server.url}/datastore/", params={"output": "all"}, timeout=30).json()[
                "objects"][image_id]["labels"].get("final"):
            _save_final_label(ensam_server, image_id)
    weights = os.path.join(ensam_server.app_dir, "model", "ensam.pt")
    before = os.stat(weights).st_mtime_ns if os.path.exists(weights) else None
    r = requests.post(f"{ensam_server.url}/train/ensam", json={
        "device": "cpu", "cpu_processes": 2, "max_seconds": 120, "max_steps": 2, "val_every": 2,
        "val_split": 0.5, "labels": "blob_a",
    }, timeout=60)
    assert r.status_code == 200, r.text
    task = _wait_task(ensam_server, "/train/", timeout=400)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    stats = requests.get(f"{ensam_server.url}/info/", timeout=30).json()["train_stats"]["ensam"]
    assert stats["status"] == "DONE" and stats["world_size"] == 2 and stats["devices"] == ["cpu", "cpu"], stats
    assert stats["steps"] == 2 and "val_box_dsc" in stats["val_best"]
    assert os.stat(weights).st_mtime_ns != before  # rank 0 published
    r = _infer(ensam_server, "ensam", "vol2", {"foreground": [[14, 12, 8]], "reset_state": True}, output="json")
    assert r.status_code == 200 and r.json()["weights"] == "ensam.pt"


# ---------------------------------------------------------------------------------------------------- active learning
def test_scoring_then_next_sample_for_each_strategy(ensam_server):
    if not requests.get(f"{ensam_server.url}/datastore/", params={"output": "all"}, timeout=30).json()[
            "objects"]["vol0"]["labels"].get("final"):
        _save_final_label(ensam_server, "vol0")
    unlabelled = sorted(i for i, o in _datastore_file(ensam_server)["objects"].items() if "final" not in o["labels"])
    for method in ("novelty", "uncertainty"):
        # run_sync: in the server process, whose engine is already loaded (the background-process path is the
        # same one batch inference and training take above)
        r = requests.post(f"{ensam_server.url}/scoring/{method}", params={"run_sync": "true"},
                          json={"labels": "blob_a", "images": ",".join(unlabelled)}, timeout=300)
        assert r.status_code == 200, r.text
        assert set(r.json()["scores"]) >= set(unlabelled), r.json()
    ds = requests.get(f"{ensam_server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    for image_id in unlabelled:  # scores are stored in the datastore's image info
        info = ds[image_id]["image"]["info"]
        assert 0.0 <= info["novelty"] <= 2.0 and 0.0 <= info["uncertainty"] <= 1.0, (image_id, info)
        assert set(info["uncertainty_labels"]) == {"blob_a"} and len(info["ensam_embedding"]["vector"]) > 8
    client = MONAILabelClient(ensam_server.url, client_id="al")
    for method in ("novelty", "uncertainty"):
        scores = {i: ds[i]["image"]["info"][method] for i in unlabelled}
        # images that differ score differently (a constant score orders nothing)
        assert len({round(v, 6) for v in scores.values()}) > 1, (method, scores)
        # the strategy's first pick is the image its score ranks first
        res = client.next_sample(method, {})
        assert res["id"] == max(unlabelled, key=lambda i: (scores[i], -unlabelled.index(i))), (method, res, scores)
        assert abs(res[method] - scores[res["id"]]) < 1e-6, (method, res, scores)
    for strategy in ("first", "random"):
        res = client.next_sample(strategy, {})
        assert res["id"] in unlabelled, (strategy, res)
    assert client.next_sample("first", {})["id"] == unlabelled[0]
    # random with a seed: the same unlabelled set and seed give the same image; seeds spread over the images
    seeded = [client.next_sample("random", {"seed": s})["id"] for s in range(12)]
    assert seeded == [client.next_sample("random", {"seed": s})["id"] for s in range(12)]
    assert set(seeded) <= set(unlabelled) and len(set(seeded)) > 1, seeded
    for bad in (-1, "3", 1.5, True):
        r = requests.post(f"{ensam_server.url}/activelearning/random", json={"seed": bad}, timeout=30)
        assert r.status_code == 400 and "seed" in r.json()["detail"], (bad, r.status_code, r.text)
    # two annotators asking novelty in a row get different images (the first is pending)
    a = client.next_sample("novelty", {})["id"]
    b = client.next_sample("novelty", {})["id"]
    assert a != b or len(unlabelled) == 1


# ---------------------------------------------------------------------------------------------------- OHIF files
def test_bundled_ohif_files_are_served(ensam_server):
    from lib.server import OHIF_DIR

    if not os.path.isdir(OHIF_DIR):
        pytest.skip("this monailabel has no bundled OHIF")
    index = requests.get(f"{ensam_server.url}/ohif/", timeout=30)
    assert index.status_code == 200 and b"<html" in index.content.lower()
    nested = next(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(OHIF_DIR, "assets")) for f in fs)
    rel = os.path.relpath(nested, OHIF_DIR)
    r = requests.get(f"{ensam_server.url}/ohif/{rel}", timeout=30)
    with open(nested, "rb") as f:
        assert r.status_code == 200 and r.content == f.read()  # not index.html (monailabel 0.8.5 bug)
    r = requests.get(f"{ensam_server.url}/ohif/%2e%2e/%2e%2e/config.py", timeout=30)
    assert r.content == index.content  # no way out of the OHIF folder
