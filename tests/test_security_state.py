"""Issue 25: requests that broke the server's state for everyone (found by an attack on ``make serve``), each sent to
a real server of its own over HTTP. Every refusal is a 4xx naming the rule or bound, changes nothing, and the
server stays up (and starts again).

* #3 JSON stored in the datastore index (image / label info, label and upload params), infer params and the JSON
  bodies of train / batch / scoring: bounded depth, finite numbers; a start-up survives an index entry it cannot read.
* #4 training budgets: finite, bounded numbers; a refused request starts nothing; non-finite numbers in an existing
  ``train_stats.json`` never make ``/info`` a 500.
* #8 ids are bounded in UTF-8 bytes (the file name, extension and temporary suffix must fit the file system);
  100000-deep JSON is a 400, not a RecursionError.
* #9 an image id is always resolved through the datastore, never against the server's working directory.
* #11 label saves racing deletes of the same image: no 5xx, no orphan label, a label never outlives its image.
* #12 re-uploading an id with another extension replaces the image; DELETE removes every file of the id.
* #14 the number and length of the label names of a training request are bounded; nothing starts when refused.
"""

from __future__ import annotations

import gzip
import json
import os
import threading

import nibabel as nib
import numpy as np
import pytest
import requests

from hostile_server import snapshot_files, start_hostile_server

TIMEOUT = 120
WORKDIR_NAMES = ("Makefile", "README.md", "setup.cfg", "apps", "tests")  # files / folders of the server's cwd


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("security"))
    for name in WORKDIR_NAMES:  # the server's working directory holds files and folders named like image ids (#9)
        if "." in name or name == "Makefile":
            with open(os.path.join(work, name), "w") as f:
                f.write("not an image\n")
        else:
            os.makedirs(os.path.join(work, name, "sub"))
    srv = start_hostile_server(work, n_images=2)
    try:
        yield srv
    finally:
        srv.stop()


def _nii(array, affine=None, gz=True) -> bytes:
    raw = nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine).to_bytes()
    return gzip.compress(raw) if gz else raw


def _objects(server) -> dict:
    r = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["objects"]


def _state(server):
    return snapshot_files(server.studies), _objects(server)


def _alive(server):
    r = requests.get(f"{server.url}/info/", timeout=30)
    assert r.status_code == 200 and server.alive(), (r.status_code, r.text[:300], server.log_tail())


def _put_image(server, image_id, data, filename="x.nii.gz"):
    return requests.put(f"{server.url}/datastore/image", params={"image": image_id},
                        files={"file": (filename, data)}, timeout=TIMEOUT)


def _put_label(server, image_id, data, params=None, tag="final"):
    return requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": tag},
                        files={"label": ("l.nii.gz", data)}, data={"params": json.dumps(params or {})},
                        timeout=TIMEOUT)


def _delete(server, image_id):
    return requests.delete(f"{server.url}/datastore/image", params={"id": image_id}, timeout=TIMEOUT)


def _train_tasks(server) -> list:
    r = requests.get(f"{server.url}/train/", params={"all": "true"}, timeout=30)
    assert r.status_code in (200, 404), r.text
    return r.json() if r.status_code == 200 else []


def _deep_dict(n: int) -> str:
    return '{"a": ' * n + "1" + "}" * n


def _deep_list(n: int) -> str:
    return "[" * n + "]" * n


def _label_files(studies: str) -> set:
    root = os.path.join(studies, "labels")
    return {os.path.join(os.path.basename(d), f) for d, _, fs in os.walk(root) for f in fs if not f.startswith(".")}


# ---------------------------------------------------------------------------------------------------- #3, #8
def test_stored_json_is_bounded_at_the_door(server):
    """Image info nested 250 deep was stored, and the index could not be read at the next start (pydantic: at most
    200 levels): the server never started again. 900 deep: stored, then GET image info 500; 100000-deep lists in
    params / info: 500 (RecursionError). Every JSON the server takes is bounded (depth, finite numbers): 400."""
    _, lab, aff = server.images["vol1"]
    label = _nii(lab.astype(np.uint8), aff)
    image = _nii(server.images["vol0"][0], aff)
    before = _state(server)
    bad = {"250 deep": _deep_dict(250), "900 deep": _deep_dict(900), "100000-deep list": '{"a": ' + _deep_list(100000)
           + "}", "NaN": '{"a": NaN}', "Infinity": '{"a": [1, -Infinity]}', "1e999": '{"a": 1e999}'}
    for name, text in bad.items():
        answers = {
            "image info": requests.put(f"{server.url}/datastore/image/info", params={"image": "vol0"},
                                       data={"info": text}, timeout=TIMEOUT),
            "label info": requests.put(f"{server.url}/datastore/label/info", params={"label": "vol0", "tag": "final"},
                                       data={"info": text}, timeout=TIMEOUT),
            "label params": requests.put(f"{server.url}/datastore/label", params={"image": "vol1", "tag": "final"},
                                         files={"label": ("l.nii.gz", label)}, data={"params": text},
                                         timeout=TIMEOUT),
            "upload params": requests.put(f"{server.url}/datastore/image", params={"image": "new"},
                                          files={"file": ("x.nii.gz", image)}, data={"params": text},
                                          timeout=TIMEOUT),
            "infer params": requests.post(f"{server.url}/infer/ensam", params={"image": "vol0", "output": "json"},
                                          data={"params": text}, timeout=TIMEOUT),
        }
        body = text.encode()
        for path in ("/train/ensam", "/batch/infer/ensam_seg", "/scoring/novelty", "/activelearning/first"):
            answers[path] = requests.post(f"{server.url}{path}", data=body,
                                          headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
        answers["batch manifest as text"] = requests.post(f"{server.url}/batch/infer/ensam",
                                                          json={"manifest": text}, timeout=TIMEOUT)
        for where, r in answers.items():
            assert r.status_code == 400, (name, where, r.status_code, r.text[:300])
            detail = r.json()["detail"]
            assert ("deep" in detail and "32" in detail) or "finite" in detail, (name, where, detail)
    assert _state(server) == before
    assert _train_tasks(server) == []
    r = requests.get(f"{server.url}/datastore/image/info", params={"image": "vol0"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    # 32 levels are fine (and stored), as is a plain object
    ok = _deep_dict(31)
    r = requests.put(f"{server.url}/datastore/image/info", params={"image": "vol0"}, data={"info": ok},
                     timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    r = requests.get(f"{server.url}/datastore/image/info", params={"image": "vol0"}, timeout=TIMEOUT)
    assert r.status_code == 200 and "a" in r.json(), r.text
    _alive(server)


# ---------------------------------------------------------------------------------------------------- #4, #14
@pytest.mark.parametrize("body, bound", [
    ({"max_seconds": "nan"}, "max_seconds"),
    ({"max_seconds": "inf", "max_steps": 0}, "max_seconds"),
    ({"max_seconds": "-inf", "max_steps": 5}, "max_seconds"),
    ({"max_seconds": 1e12}, "max_seconds"),
    ({"max_seconds": -1, "max_steps": 0}, "max_seconds"),
    ({"max_steps": 1e15}, "max_steps"),
    ({"max_steps": "nan"}, "max_steps"),
    ({"val_every": -3}, "val_every"),
    ({"learning_rate": "nan"}, "learning_rate"),
    ({"learning_rate": 1e6}, "learning_rate"),
    ({"val_split": "nan"}, "val_split"),
    ({"rehearsal": "inf"}, "rehearsal"),
    ({"seed": "inf"}, "seed"),
    ({"seed": -1}, "seed"),
    ({"labels": ",".join(f"n{i}" for i in range(10000))}, "256"),
    ({"labels": [f"n{i}" for i in range(40000)]}, "256"),
    ({"labels": "x" * 1000}, "label name"),
    ({"labels": [{"a": 1}]}, "label name"),
    ({"junk": "x" * 300000}, "KiB"),
])
def test_hostile_training_requests_are_refused_and_start_nothing(server, body, bound):
    """``{"max_seconds": "nan"}`` was 200: the run ended in ERROR, train_stats.json kept NaN and /info answered 500
    from then on; "inf" with max_steps 0 ran without a limit; 10k label names: 500 with the job started anyway; 40k:
    SUBMITTED forever. Every number is finite and in its documented range, label names are bounded: 400 naming
    the parameter / bound, and no training task is created."""
    before = len(_train_tasks(server))
    r = requests.post(f"{server.url}/train/ensam", json=body, timeout=TIMEOUT)
    assert r.status_code == 400 and bound in r.json()["detail"], (body if len(str(body)) < 300 else bound,
                                                                  r.status_code, r.text[:300])
    r = requests.post(f"{server.url}/train/", json={"ensam": body}, timeout=TIMEOUT)  # the all-trainers route
    assert r.status_code == 400 and bound in r.json()["detail"], (r.status_code, r.text[:300])
    assert len(_train_tasks(server)) == before
    _alive(server)


def test_literal_nan_in_a_training_body_is_refused_before_anything_starts(server):
    before = len(_train_tasks(server))
    for text in ('{"max_seconds": NaN}', '{"max_seconds": Infinity, "max_steps": 0}', '{"learning_rate": -Infinity}'):
        r = requests.post(f"{server.url}/train/ensam", data=text, headers={"Content-Type": "application/json"},
                          timeout=TIMEOUT)
        assert r.status_code == 400 and "finite" in r.json()["detail"], (text, r.status_code, r.text[:300])
    assert len(_train_tasks(server)) == before
    _alive(server)


def test_non_finite_train_stats_do_not_break_info(server):
    """A train_stats.json holding NaN / Infinity (written by a run before this fix) made /info and /model/info 500
    (Slicer and OHIF could not connect), across restarts: they are read as null."""
    path = os.path.join(server.app_dir, "model", "train_stats.json")
    with open(path, "w") as f:
        f.write('{"name": "ensam", "status": "ERROR", "max_seconds": NaN, "best_metric": Infinity, '
                '"history": [{"loss": -Infinity, "step": 1}], "epoch": 3}')
    try:
        r = requests.get(f"{server.url}/info/", timeout=30)
        assert r.status_code == 200, r.text[:300]
        stats = r.json()["train_stats"]["ensam"]
        assert stats["max_seconds"] is None and stats["best_metric"] is None and stats["epoch"] == 3, stats
        assert stats["history"][0]["loss"] is None, stats
        r = requests.get(f"{server.url}/model/info/ensam", timeout=30)
        assert r.status_code == 200 and r.json()["train_stats"]["max_seconds"] is None, r.text[:300]
    finally:
        os.remove(path)


# ---------------------------------------------------------------------------------------------------- #8
def test_ids_are_bounded_in_bytes(server):
    """The id rule counted characters: a 230-byte id (or 110 two-byte characters) passed it, then the datastore's
    file name + extension + temporary suffix was too long for the file system (ENAMETOOLONG): 500."""
    vol = _nii(server.images["vol0"][0], server.images["vol0"][2])
    before = _state(server)
    for image_id in ("a" * 230, "\u00e9" * 110, "\U0001F600" * 60):
        r = _put_image(server, image_id, vol)
        assert r.status_code == 400 and "200 bytes" in r.json()["detail"], (len(image_id), r.status_code, r.text[:300])
        for method, path, kw in (("get", "/datastore/image", {"params": {"image": image_id}}),
                                 ("post", "/infer/ensam", {"params": {"image": image_id, "output": "json"},
                                                           "data": {"params": '{"foreground": [[1, 1, 1]]}'}})):
            r = requests.request(method, f"{server.url}{path}", timeout=TIMEOUT, **kw)
            assert r.status_code == 400, (path, r.status_code, r.text[:300])
    assert _state(server) == before
    longest = "\u00e9" * 100  # 200 bytes: the longest id
    r = _put_image(server, longest, vol)
    assert r.status_code == 200 and r.json()["image"] == longest, r.text[:300]
    r = requests.get(f"{server.url}/datastore/image", params={"image": longest}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == vol
    assert _delete(server, longest).status_code == 200
    _alive(server)


# ---------------------------------------------------------------------------------------------------- #9
def test_ids_naming_files_of_the_working_directory_are_datastore_images(server):
    """An image stored as ``Makefile`` (``README.md``, ``apps``, ...) was read from the server's working directory
    at inference (monailabel tests ``os.path.exists(image_id)`` first): 500. The id is always the datastore's."""
    img, _, aff = server.images["vol0"]
    for name in WORKDIR_NAMES:
        assert os.path.exists(os.path.join(server.work, name))
        r = _put_image(server, name, _nii(img, aff))
        assert r.status_code == 200 and r.json()["image"] == name, r.text
    try:
        for name in WORKDIR_NAMES:
            r = requests.post(f"{server.url}/infer/ensam", params={"image": name, "output": "json"},
                              data={"params": json.dumps({"foreground": [[14, 12, 8]]})}, timeout=TIMEOUT)
            assert r.status_code == 200, (name, r.status_code, r.text[:300])
            assert r.json().get("label_names") is not None, r.text[:300]
    finally:
        for name in WORKDIR_NAMES:
            _delete(server, name)
    _alive(server)


# ---------------------------------------------------------------------------------------------------- #11
def test_label_saves_racing_deletes_leave_no_orphan(server):
    """Label saves racing a DELETE of their image: some saves were 500 (FileNotFoundError), orphan labels stayed on
    disk with DELETE answering 200, and an orphan was later attached to a different image uploaded under the same
    id (every fine-tuning then ended in ERROR: 'label shape differs'). Saves and deletes of one id are serialised:
    a save for an image deleted meanwhile is 404, DELETE removes its labels, no answer is a 5xx."""
    img, lab, aff = server.images["vol0"]
    image, label = _nii(img, aff), _nii(lab.astype(np.uint8), aff)
    statuses, lock = [], threading.Lock()
    rounds = 12

    def record(what, r):
        with lock:
            statuses.append((what, r.status_code, r.text[:200]))

    for k in range(rounds):
        image_id = f"race{k % 3}"
        assert _put_image(server, image_id, image).status_code == 200
        stop = threading.Event()

        def saver(image_id, tag, stop):
            while not stop.is_set():
                record("save", _put_label(server, image_id, label, {"label_info": [{"name": "blob_a", "idx": 1}]},
                                          tag=tag))

        threads = [threading.Thread(target=saver, args=(image_id, tag, stop))
                   for tag in ("final", "final", "original")]
        for t in threads:
            t.start()
        threading.Event().wait(0.05 + 0.1 * (k % 4))
        record("delete", _delete(server, image_id))
        stop.set()
        for t in threads:
            t.join()
        assert image_id not in _objects(server)
        leftover = {f for f in _label_files(server.studies) if f.split(os.sep)[-1].startswith(image_id + ".")}
        assert not leftover, (k, leftover)
    fives = [s for s in statuses if s[1] >= 500]
    assert not fives, fives[:5]
    assert {s[1] for s in statuses if s[0] == "save"} <= {200, 404}, statuses
    assert all(s[1] == 200 for s in statuses if s[0] == "delete"), statuses
    # the same id uploaded again (another image): no label comes back, not even after the datastore's refresh
    small = np.zeros((20, 18, 10), np.float32)
    small[5:10, 5:10, 3:6] = 100
    for k in range(3):
        assert _put_image(server, f"race{k}", _nii(small)).status_code == 200
    assert _put_image(server, "refresh", image).status_code == 200
    assert _delete(server, "refresh").status_code == 200  # DELETE refreshes the index from the files on disk
    objects = _objects(server)
    for k in range(3):
        assert objects[f"race{k}"]["labels"] == {}, objects[f"race{k}"]
        assert _delete(server, f"race{k}").status_code == 200
    _alive(server)


# ---------------------------------------------------------------------------------------------------- #12
def test_reupload_with_another_extension_replaces_and_delete_removes_every_file(server):
    """An id uploaded as .nii, then as .nii.gz, then DELETEd: 200, yet the id was still listed and served the older
    file. The upload replaces the image of that id (the old file goes) and DELETE removes every file of the id."""
    img, _, aff = server.images["vol1"]
    old, new = _nii(img, aff, gz=False), _nii(img * 0.5, aff)
    assert _put_image(server, "twice", old, filename="x.nii").status_code == 200
    assert _put_image(server, "twice", new, filename="x.nii.gz").status_code == 200
    files = sorted(f for f in os.listdir(server.studies) if f.startswith("twice"))
    assert files == ["twice.nii.gz"], files
    r = requests.get(f"{server.url}/datastore/image", params={"image": "twice"}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == new
    # a second file of the id put there by hand (outside the API): DELETE removes it too
    with open(os.path.join(server.studies, "twice.nii"), "wb") as f:
        f.write(old)
    assert _delete(server, "twice").status_code == 200
    assert "twice" not in _objects(server)
    assert not [f for f in os.listdir(server.studies) if f.startswith("twice")]
    r = requests.get(f"{server.url}/datastore/image", params={"image": "twice"}, timeout=TIMEOUT)
    assert r.status_code == 404, r.status_code
    _alive(server)


# ---------------------------------------------------------------------------------------------------- restart
@pytest.fixture(scope="module")
def planted_server(tmp_path_factory):
    """A server started over a datastore whose index holds one entry it cannot read (image info 250 deep, as a
    server before this fix stored it) and a label file without its image (an orphan left by a delete race)."""
    work = str(tmp_path_factory.mktemp("security_start"))
    studies = os.path.join(work, "studies")
    os.makedirs(os.path.join(studies, "labels", "final"))
    deep = json.loads(_deep_dict(250))
    index = {"name": "new-dataset", "description": "New Dataset", "images_dir": ".", "labels_dir": "labels",
             "objects": {"vol0": {"image": {"ext": ".nii.gz", "info": {"ts": 1, "name": "vol0.nii.gz", "x": deep}},
                                  "labels": {}},
                         "vol1": {"image": {"ext": ".nii.gz", "info": {"ts": 1, "name": "vol1.nii.gz", "keep": "me"}},
                                  "labels": {}}}}
    with open(os.path.join(studies, "datastore_v2.json"), "w") as f:
        json.dump(index, f)
    from conftest import synthetic_volume
    _, lab, aff = synthetic_volume(1)
    with open(os.path.join(studies, "labels", "final", "ghost.nii.gz"), "wb") as f:
        f.write(_nii(lab.astype(np.uint8), aff))
    srv = start_hostile_server(work, n_images=2)
    try:
        yield srv
    finally:
        srv.stop()


def test_a_start_survives_an_unreadable_index_entry(planted_server):
    """One index entry pydantic cannot read (250 levels) made every start fail ("Application startup failed"):
    that entry is skipped and logged, the others keep their info, the image is listed again from its file."""
    objects = _objects(planted_server)
    assert set(objects) >= {"vol0", "vol1"}, objects.keys()
    assert objects["vol1"]["image"]["info"].get("keep") == "me", objects["vol1"]
    assert "x" not in objects["vol0"]["image"]["info"]
    with open(planted_server.log_path, errors="replace") as f:
        log = f.read()
    assert "vol0" in log and "skipped" in log, planted_server.log_tail()
    _alive(planted_server)


def test_a_label_without_its_image_is_set_aside_at_start(planted_server):
    """A label file without its image stayed in labels/final and was attached to whatever image was uploaded under
    that id later. At start-up it is set aside (logged), so a new image of that id has no label."""
    assert "final/ghost.nii.gz" not in _label_files(planted_server.studies)
    img, _, aff = planted_server.images["vol0"]
    assert _put_image(planted_server, "ghost", _nii(img, aff)).status_code == 200
    assert _put_image(planted_server, "refresh", _nii(img, aff)).status_code == 200
    assert _delete(planted_server, "refresh").status_code == 200  # DELETE refreshes the index from the files
    assert _objects(planted_server)["ghost"]["labels"] == {}
    with open(planted_server.log_path, errors="replace") as f:
        assert "ghost" in f.read()
    assert _delete(planted_server, "ghost").status_code == 200
    _alive(planted_server)
