"""Issue 10: what a new user's requests found, over HTTP against the real server (``ensam_server`` in
conftest.py, shared with test_app_server.py): ids that are file paths, unknown task names, corrupt uploads, server
faults reported as client errors, concurrent clicks of one session, and unbounded requests.

Every test leaves the datastore as it found it (uploads are deleted again): test_app_server.py counts its images."""

from __future__ import annotations

import json
import os
import threading

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import SHAPE, synthetic_volume
from test_app_server import TIMEOUT, _infer


def _nifti_bytes(tmp_path, array, affine=None, name="scan.nii.gz") -> bytes:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path.read_bytes()


def _objects(server) -> dict:
    r = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["objects"]


def _files_under(root) -> set:
    """Every file the server could have written under ``root``, but its logs and Python's byte-code caches."""
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
            if not f.endswith(".log") and "__pycache__" not in d and os.sep + "logs" not in d}


def _put_image(server, image_id, data, route="/datastore/image", filename="scan.nii.gz"):
    return requests.put(f"{server.url}{route}", params={"image": image_id} if image_id else None,
                        files={"file": (filename, data)}, timeout=TIMEOUT)


def _put_label(server, image_id, data, tag="final", filename="label.nii.gz"):
    return requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": tag},
                        files={"label": (filename, data)}, timeout=TIMEOUT)


def _delete_image(server, image_id):
    requests.delete(f"{server.url}/datastore/image", params={"id": image_id}, timeout=TIMEOUT)


# ---------------------------------------------------------------------------------------------------- 1: ids
def test_only_datastore_images_can_be_segmented(ensam_server, tmp_path):
    img, _, aff = ensam_server.images["vol0"]
    outside = tmp_path / "scan.nii.gz"  # a readable image on the server, outside the datastore
    nib.save(nib.Nifti1Image(img, aff), str(outside))
    click = {"foreground": [[14, 12, 8]]}
    for model in ("ensam", "ensam_seg"):
        r = _infer(ensam_server, model, str(outside), click, output="json")
        assert r.status_code == 400 and "datastore" in r.json()["detail"], r.text
    # the params must not name another image than the checked one
    r = _infer(ensam_server, "ensam", "vol0", dict(click, image=str(outside)), output="json")
    assert r.status_code == 400 and "'image'" in r.json()["detail"], r.text
    r = _infer(ensam_server, "ensam", "vol0", dict(click, image="vol0", client_id="same-id"), output="json")
    assert r.status_code == 200, r.text  # repeating the same id is fine
    for bad in ("../../etc/passwd", "/etc/passwd", "..", "sub/vol0"):
        r = _infer(ensam_server, "ensam", bad, click, output="json")
        assert r.status_code == 400 and "not a file path" in r.json()["detail"], (bad, r.text)
    r = requests.post(f"{ensam_server.url}/infer/ensam", params={"session_id": "../../x", "output": "json"},
                      data={"params": json.dumps(click)}, timeout=TIMEOUT)
    assert r.status_code == 400, r.text

    # a result saved under a label tag that is a path would be written outside the datastore
    before = _files_under(os.path.dirname(ensam_server.studies))
    r = _infer(ensam_server, "ensam", "vol0", dict(click, save_label=True, label_tag="../../escaped"),
               output="json")
    assert r.status_code == 400 and "tag" in r.json()["detail"], r.text
    assert _files_under(os.path.dirname(ensam_server.studies)) == before


@pytest.mark.parametrize("method, path, kw", [
    ("get", "/datastore/image", {"params": {"image": "../../etc/passwd"}}),
    ("head", "/datastore/image", {"params": {"image": "/etc/passwd"}}),
    ("get", "/datastore/image/info", {"params": {"image": "../vol0"}}),
    ("get", "/datastore/label", {"params": {"label": "../../vol0", "tag": "final"}}),
    ("get", "/datastore/label", {"params": {"label": "vol0", "tag": "../../labels"}}),
    ("delete", "/datastore/image", {"params": {"id": "../studies/vol0"}}),
    ("post", "/batch/infer/ensam_seg", {"json": {"images": ["/etc/passwd"]}}),
    ("post", "/batch/infer/ensam_seg", {"json": {"label_tag": "../../x"}}),
    ("post", "/batch/infer/ensam", {"json": {"manifest": "/etc/passwd"}}),
    ("post", "/batch/infer/ensam", {"json": {"manifest": {"../vol0": {"foreground": [[1, 1, 1]]}}}}),
    ("post", "/scoring/novelty", {"json": {"images": "vol0,../../x"}}),
])
def test_path_like_ids_are_refused_on_every_route(ensam_server, method, path, kw):
    r = requests.request(method, f"{ensam_server.url}{path}", timeout=TIMEOUT, **kw)
    assert r.status_code == 400, (path, kw, r.status_code, r.text)
    if method != "head":
        assert "not a file path" in r.json()["detail"] or "manifest" in r.json()["detail"], r.text


def test_unknown_ids_are_404(ensam_server):
    r = requests.post(f"{ensam_server.url}/batch/infer/ensam_seg", json={"images": ["nosuch"]}, timeout=TIMEOUT)
    assert r.status_code == 404 and "nosuch" in r.json()["detail"], r.text
    r = requests.post(f"{ensam_server.url}/scoring/novelty", json={"images": ["nosuch"]}, timeout=TIMEOUT)
    assert r.status_code == 404 and "nosuch" in r.json()["detail"], r.text
    r = requests.put(f"{ensam_server.url}/datastore/image/info", params={"image": "nosuch"},
                     data={"info": "{}"}, timeout=TIMEOUT)
    assert r.status_code == 404, r.text
    r = requests.delete(f"{ensam_server.url}/datastore/image", params={"id": "nosuch"}, timeout=TIMEOUT)
    assert r.status_code == 404, r.text


def test_dicom_seg_output_needs_a_dicom_series(ensam_server):
    """A DICOM SEG references the instances of a DICOM series: a NIfTI datastore has none, so output=dicom_seg is a
    400 saying so (monailabel answered 500). The SEG itself is tested on a real Orthanc (test_orthanc_ohif.py)."""
    r = _infer(ensam_server, "ensam", "vol0", {"foreground": [[14, 12, 8]]}, output="dicom_seg")
    assert r.status_code == 400 and "DICOM series" in r.json()["detail"], r.text


# ---------------------------------------------------------------------------------------------------- 2: labels
def test_label_for_a_path_like_id_or_tag_is_refused_and_writes_nothing(ensam_server, tmp_path):
    _, lab, aff = ensam_server.images["vol3"]
    data = _nifti_bytes(tmp_path, lab, aff)
    root = os.path.dirname(ensam_server.studies)
    before = _files_under(root)
    for image_id, tag in (("../../x", "final"), ("/tmp/x", "final"), ("vol3", "../../escaped")):
        r = _put_label(ensam_server, image_id, data, tag=tag)
        assert 400 <= r.status_code < 500 and "not a file path" in r.json()["detail"], (image_id, tag, r.text)
    r = _put_label(ensam_server, "nosuch", data)
    assert r.status_code == 404 and "nosuch" in r.json()["detail"], r.text
    assert _files_under(root) == before
    assert "final" not in _objects(ensam_server)["vol3"]["labels"]


# ---------------------------------------------------------------------------------------------------- 3: names
@pytest.mark.parametrize("path, known", [
    ("/activelearning/nope", "random"),
    ("/scoring/nope", "novelty"),
    ("/infer/nope", "ensam_seg"),
    ("/batch/infer/nope", "ensam_seg"),
    ("/train/nope", "ensam"),
])
def test_unknown_task_names_are_404_naming_the_known_ones(ensam_server, path, known):
    r = requests.post(f"{ensam_server.url}{path}", params={"image": "vol0"}, json={}, timeout=TIMEOUT)
    assert r.status_code == 404, r.text
    assert "'nope'" in r.json()["detail"] and known in r.json()["detail"], r.text


# ---------------------------------------------------------------------------------------------------- 4: uploads
def test_corrupt_uploads_are_refused_and_leave_nothing(ensam_server, tmp_path):
    root = os.path.dirname(ensam_server.studies)
    before_files, before_ids = _files_under(root), set(_objects(ensam_server))
    flat = _nifti_bytes(tmp_path, np.zeros((8, 8), np.float32), name="flat.nii.gz")
    for route in ("/datastore/", "/datastore/image"):
        for data, filename in ((b"not an image at all", "junk.nii.gz"), (b"\x1f\x8b\x08junk", "junk.nii.gz"),
                               (b"NRRD0004\ngarbage", "junk.nrrd"), (flat, "flat.nii.gz")):
            r = _put_image(ensam_server, "junk_upload", data, route=route, filename=filename)
            assert r.status_code == 400 and "image" in r.json()["detail"], (route, filename, r.text)
        r = _put_image(ensam_server, "", b"not an image", route=route, filename="junk_upload.nii.gz")
        assert r.status_code == 400, r.text
        r = _put_image(ensam_server, "../escaped", flat, route=route)
        assert r.status_code == 400 and "not a file path" in r.json()["detail"], r.text
    _, lab, aff = ensam_server.images["vol4"]
    for data, status in ((b"not a label", 400), (_nifti_bytes(tmp_path, lab[:-1], aff), 422),
                         (_nifti_bytes(tmp_path, np.zeros((4, 4), np.uint8)), 400)):
        r = _put_label(ensam_server, "vol4", data)
        assert r.status_code == status and ("label" in r.json()["detail"]), r.text
    r = _put_label(ensam_server, "vol4", b"\x00" * 10, filename="label.bin")  # OHIF's raw voxels, wrong size
    assert r.status_code == 422 and str(int(np.prod(SHAPE))) in r.json()["detail"], r.text
    assert _files_under(root) == before_files and set(_objects(ensam_server)) == before_ids
    assert "final" not in _objects(ensam_server)["vol4"]["labels"]

    # a real image and a label on its grid are still welcome
    img, lab, aff = synthetic_volume(11)
    try:
        r = _put_image(ensam_server, "upload_ok", _nifti_bytes(tmp_path, img, aff))
        assert r.status_code == 200 and r.json()["image"] == "upload_ok", r.text
        r = _put_label(ensam_server, "upload_ok", _nifti_bytes(tmp_path, lab, aff, name="l.nii.gz"), tag="mine")
        assert r.status_code == 200, r.text
        assert "mine" in _objects(ensam_server)["upload_ok"]["labels"]
    finally:
        _delete_image(ensam_server, "upload_ok")
    assert "upload_ok" not in _objects(ensam_server)


def test_a_wrong_size_raw_label_of_an_inference_is_refused_and_changes_nothing(ensam_server, tmp_path):
    """OHIF's raw ``.bin`` label sent with ``/infer`` (monailabel reshapes it onto the image: a 500 before): 422
    naming the sizes when it is not one byte per voxel, 400 without a datastore image; nothing is written."""
    root = os.path.dirname(ensam_server.studies)
    before_files, before_ids = _files_under(root), set(_objects(ensam_server))
    img, _, aff = ensam_server.images["vol4"]
    click = json.dumps({"foreground": [[14, 12, 8]]})
    url = f"{ensam_server.url}/infer/ensam"
    r = requests.post(url, params={"image": "vol4", "output": "json"}, data={"params": click},
                      files={"label": ("label.bin", b"\x00" * 10)}, timeout=TIMEOUT)
    assert r.status_code == 422 and "10 bytes" in r.json()["detail"], r.text
    assert str(int(np.prod(SHAPE))) in r.json()["detail"], r.text
    upload = {"file": ("scan.nii.gz", _nifti_bytes(tmp_path, img, aff)), "label": ("label.bin", b"\x00" * img.size)}
    r = requests.post(url, params={"output": "json"}, data={"params": click}, files=upload, timeout=TIMEOUT)
    assert r.status_code == 400 and "?image=" in r.json()["detail"], r.text
    assert _files_under(root) == before_files and set(_objects(ensam_server)) == before_ids
    # one byte per voxel is still welcome
    r = requests.post(url, params={"image": "vol4", "output": "json"}, data={"params": click},
                      files={"label": ("label.bin", b"\x00" * img.size)}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------------- 5: faults
def test_a_server_fault_is_a_500_with_its_traceback_logged(ensam_server, tmp_path):
    """A datastore file that went bad on the server is not the client's error (it used to be a 400)."""
    img, _, aff = synthetic_volume(12)
    try:
        r = _put_image(ensam_server, "goes_bad", _nifti_bytes(tmp_path, img, aff))
        assert r.status_code == 200, r.text
        stored = os.path.join(ensam_server.studies, "goes_bad.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), stored)  # now 2D: load_volume fails
        r = _infer(ensam_server, "ensam", "goes_bad", {"foreground": [[3, 3, 3]]}, output="json")
        assert r.status_code == 500, r.text
        log = ensam_server.log_tail(200)
        assert "Traceback" in log and "expected a 3D volume" in log, log
    finally:
        _delete_image(ensam_server, "goes_bad")


# ---------------------------------------------------------------------------------------------------- 6: sessions
def test_concurrent_clicks_of_one_session_build_one_history(ensam_server):
    base = {"client_id": "concurrent", "label": "blob_b", "foreground": [[34, 27, 15]]}
    n = 4
    answers = [None] * n

    def click(k):
        answers[k] = _infer(ensam_server, "ensam", "vol2", base, output="json", timeout=300)

    threads = [threading.Thread(target=click, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    res = [a.json() for a in answers]
    # one after the other: each click saw the result of the one before, none was lost
    assert sorted(r["session"]["step"] for r in res) == list(range(1, n + 1)), res
    assert sorted(r["previous_mask"] for r in res) == [False] + [True] * (n - 1), res
    for depth in range(n - 1, -1, -1):
        r = _infer(ensam_server, "ensam", "vol2", {"client_id": "concurrent", "label": "blob_b", "undo": True},
                   output="json")
        assert r.status_code == 200 and r.json()["session"]["step"] == depth, r.text


def test_a_failed_request_does_not_reset_the_session(ensam_server):
    base = {"client_id": "reset-fails", "label": "blob_a"}
    r = _infer(ensam_server, "ensam", "vol1", dict(base, foreground=[[17, 10, 9]], reset_state=True), output="json")
    assert r.status_code == 200 and r.json()["session"]["step"] == 1, r.text
    # after a reset only a background click is left: nothing to segment, the engine refuses it
    r = _infer(ensam_server, "ensam", "vol1", dict(base, background=[[40, 35, 20]], reset_state=True))
    assert r.status_code == 422 and "no prompt" in r.json()["detail"], r.text
    r = _infer(ensam_server, "ensam", "vol1", dict(base, undo=True), output="json")
    assert r.status_code == 200 and r.json()["session"]["step"] == 0, r.text  # step 1 was still there to undo


# ---------------------------------------------------------------------------------------------------- 7: limits
def test_request_size_limits(ensam_server):
    pts = [[1 + k % 40, 1 + (k // 40) % 30, 5] for k in range(257)]
    r = _infer(ensam_server, "ensam", "vol0", {"foreground": pts}, output="json")
    assert r.status_code == 413 and "256 points" in r.json()["detail"], r.text
    r = _infer(ensam_server, "ensam", "vol0", {"foreground": pts[:200], "points": pts[:57], "point_labels": [0] * 57},
               output="json")
    assert r.status_code == 413 and "256 points" in r.json()["detail"], r.text
    boxes = [[1, 5, 1, 5, 1, 5]] * 33
    r = _infer(ensam_server, "ensam", "vol0", {"boxes": boxes}, output="json")
    assert r.status_code == 413 and "32 boxes" in r.json()["detail"], r.text
    r = _infer(ensam_server, "ensam", "vol0", {"boxes": boxes[:32], "roi": boxes[0]}, output="json")
    assert r.status_code == 413 and "32 boxes" in r.json()["detail"], r.text
    # a batch manifest is checked entry by entry before anything starts
    manifest = {"vol0": [{"label": "a", "foreground": pts}]}
    r = requests.post(f"{ensam_server.url}/batch/infer/ensam", json={"manifest": manifest}, timeout=TIMEOUT)
    assert r.status_code == 413 and "256 points" in r.json()["detail"], r.text
    manifest = {"vol0": [{"label": f"o{k}", "foreground": [[14, 12, 8]]} for k in range(33)]}
    r = requests.post(f"{ensam_server.url}/batch/infer/ensam", json={"manifest": manifest}, timeout=TIMEOUT)
    assert r.status_code == 413 and "32 objects" in r.json()["detail"], r.text
    # a request body over the limit is refused before it is read (JSON: 4 MiB by default)
    big = {"images": "all", "pad": "x" * (5 * 2**20)}
    r = requests.post(f"{ensam_server.url}/scoring/novelty", json=big, timeout=TIMEOUT)
    assert r.status_code == 413 and "MiB" in r.json()["detail"], r.text

    def chunks():  # no Content-Length: counted while it streams
        for _ in range(5):
            yield b" " * 2**20
        yield b"{}"

    r = requests.post(f"{ensam_server.url}/activelearning/random", data=chunks(),
                      headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 413, r.text
