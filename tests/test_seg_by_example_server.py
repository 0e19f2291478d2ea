"""``ensam_seg`` by example over HTTP (issue 12): a real server whose reference atlases are two labelled synthetic
volumes; ``blob_a`` validates above the floor (atlas route), ``blob_b`` below it (not offered)."""

from __future__ import annotations

import json
import os
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import _copy_app, serve, synthetic_volume
from test_app_server import _mask_from_multipart, _save_final_label

pytest.importorskip("SimpleITK")

TIMEOUT = 180


@pytest.fixture(scope="module")
def atlas_server(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("seg_by_example"))
    app_dir = _copy_app(os.path.join(work, "app"))
    atlases = os.path.join(work, "atlases")
    os.makedirs(os.path.join(atlases, "imagesTr"))
    os.makedirs(os.path.join(atlases, "labelsTr"))
    entries = []
    for n, shift in enumerate([(3, -2, 1), (-2, 2, 0)]):
        img, lab, aff = synthetic_volume(10 + n, shift)
        nib.save(nib.Nifti1Image(img, aff), os.path.join(atlases, "imagesTr", f"atlas{n}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), os.path.join(atlases, "labelsTr", f"atlas{n}.nii.gz"))
        entries.append({"image": f"imagesTr/atlas{n}.nii.gz", "label": f"labelsTr/atlas{n}.nii.gz",
                        "modality": "MR", "labels": {"1": "blob_a", "2": "blob_b"}})
    with open(os.path.join(atlases, "dataset.json"), "w") as f:
        json.dump({"training": entries}, f)
    with open(os.path.join(app_dir, "model", "atlas_validation.json"), "w") as f:
        json.dump({"validation": {"blob_a": {"atlas+ensam": 0.8, "atlas": 0.7},
                                  "blob_b": {"atlas+ensam": 0.2, "atlas": 0.1}}}, f)
    studies = os.path.join(work, "studies")
    os.makedirs(studies)
    images = {}
    for n, shift in enumerate([(0, 0, 0), (1, 2, -1)]):
        img, lab, aff = synthetic_volume(20 + n, shift)
        nib.save(nib.Nifti1Image(img, aff), os.path.join(studies, f"img{n}.nii.gz"))
        images[f"img{n}"] = (img, lab, aff)
    yield from serve(work, app_dir, studies, images, "--conf", "labels", "blob_a,blob_b", "--conf", "atlases", atlases,
                     "--conf", "atlas_threads", "1")


def _infer(server, image, params):
    return requests.post(f"{server.url}/infer/ensam_seg", params={"image": image, "output": "all"},
                         data={"params": json.dumps(params)}, timeout=TIMEOUT)


def test_info_lists_the_routes_and_what_is_not_offered(atlas_server):
    seg = requests.get(f"{atlas_server.url}/info/", timeout=30).json()["models"]["ensam_seg"]
    assert seg["routes"]["blob_a"] == {"route": "atlas+ensam", "validation": 0.8, "atlases": 2}
    assert "blob_a" in seg["labels"] and "blob_b" not in seg["labels"] and "liver" not in seg["labels"]
    assert "below the floor 0.35" in seg["not_offered"]["blob_b"]
    assert "no atlas carries it" in seg["not_offered"]["liver"]
    assert seg["floor"] == 0.35 and seg["config"]["labels"] == "blob_a"


def test_a_label_name_answers_a_mask_with_its_confidence(atlas_server):
    img, lab, aff = atlas_server.images["img0"]
    r = _infer(atlas_server, "img0", {"labels": "blob_a"})
    assert r.status_code == 200, r.text
    mask, affine, params = _mask_from_multipart(r)
    value = params["label_names"]["blob_a"]
    assert mask.shape == img.shape and np.allclose(affine, aff)
    s = params["structures"]["blob_a"]
    assert s["route"] == "atlas+ensam" and s["atlases"] == ["atlas0", "atlas1"]
    assert 0.0 <= s["uncertainty"] <= 1.0 and 0.0 <= s["agreement"] <= 1.0
    assert s["prompts"]["box"] and s["prompts"]["foreground"] >= 1
    from lib.evaluation.metrics import dice

    got = dice(mask == value, lab == 1)
    print(f"\nblob_a DSC {got:.3f} (atlas-only {s['atlas_voxels']} voxels, answer {s['voxels']}); "
          f"{params['latencies']}")
    assert got > 0.5


def test_an_unoffered_name_is_a_422_that_says_why(atlas_server):
    r = _infer(atlas_server, "img0", {"labels": "blob_a,blob_b"})
    assert r.status_code == 422, r.text
    assert "not offered" in r.text and "blob_b" in r.text and "floor" in r.text
    r = _infer(atlas_server, "img0", {"labels": "no_such_organ"})
    assert r.status_code == 422 and "unknown label name" in r.text


def test_batch_inference_uses_the_atlas_route_with_progress(atlas_server):
    r = requests.post(f"{atlas_server.url}/batch/infer/ensam_seg", params={"images": "all"},
                      json={"max_workers": 1, "labels": "blob_a"}, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.time() + 600
    while time.time() < deadline:
        task = requests.get(f"{atlas_server.url}/batch/infer/", timeout=30).json()
        if task.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        time.sleep(1.0)
    assert task["status"] == "DONE", task
    lines = "\n".join(task["details"])
    assert "ensam batch: 2/2" in lines and "finished 2 ok, 0 failed" in lines, lines
    assert "registered" in atlas_server.log_tail(400) or "registered" in lines
    from lib.evaluation.metrics import dice

    for image_id, (img, lab, _) in atlas_server.images.items():  # every written mask opened and scored
        m = np.asarray(nib.load(os.path.join(atlas_server.studies, "labels", "original",
                                             f"{image_id}.nii.gz")).dataobj)
        got = dice(m > 0, lab == 1)
        print(f"\nbatch prompt-free {image_id}: blob_a DSC {got:.3f}")
        assert m.shape == img.shape and got > 0.5, (image_id, got)


def test_uncertainty_score_is_the_atlas_disagreement(atlas_server):
    r = requests.post(f"{atlas_server.url}/scoring/uncertainty", params={"run_sync": "true"},
                      json={"labels": "blob_a", "images": "img1", "force": True}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    ds = requests.get(f"{atlas_server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    info = ds["img1"]["image"]["info"]
    assert set(info["uncertainty_labels"]) == {"blob_a"} and info["uncertainty_meta"]["atlas"] == ["blob_a"]
    assert 0.0 <= info["uncertainty"] <= 1.0


def test_a_final_label_in_the_datastore_becomes_an_atlas(atlas_server):
    _save_final_label(atlas_server, "img0")  # as 3D Slicer saves it: label_info [{"name": "blob_a", "idx": 1}, ...]
    r = _infer(atlas_server, "img1", {"labels": "blob_a"})
    assert r.status_code == 200, r.text
    _, _, params = _mask_from_multipart(r)
    s = params["structures"]["blob_a"]
    assert "datastore:img0" in s["atlases"] and len(s["atlases"]) == 3, s
