"""Batch inference (``lib.batch``): one job code for the local backend, a Ray cluster and the REST route.

A local Ray cluster of a head and one more node (``ray.cluster_utils.Cluster``, 1 CPU each) segments a dozen small
synthetic studies (8 prompt-free, 4 with a manifest's prompts) plus one corrupt file: every result equals the
single-process local backend's voxel for voxel (same key, same voxels), although the worker node is removed while
the job runs; every study ends with exactly one result; the corrupt study is recorded as failed with its reason.
A job killed half way and run again does only the missing studies. The REST route ``POST /batch/infer/ensam_seg``
of a real server, set to ``batch_backend ray`` on the same cluster, runs the same job (same keys, same masks).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import BLOBS, ROOT, serve, synthetic_volume, _copy_app

ray = pytest.importorskip("ray")

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline: no usage reports
pytestmark = pytest.mark.timeout(600)  # each test (the Ray ones took 80-120 s on 2 busy cores)
N_NAMES, N_PROMPTS = 8, 4
NAMES = ["liver", "spleen"]
PY = sys.executable
APP = os.path.join(ROOT, "apps", "ensam")


def _weights() -> str:
    from lib.batch.__main__ import default_weights

    return default_weights(APP)


def _write_studies(folder: str, n: int, corrupt: bool = True) -> None:
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        img, _, aff = synthetic_volume(100 + k, (k % 3 - 1, (2 * k) % 3 - 1, k % 2))
        nib.save(nib.Nifti1Image(img, aff), os.path.join(folder, f"study{k:02d}.nii.gz"))
    if corrupt:
        with open(os.path.join(folder, "corrupt.nii.gz"), "wb") as f:
            f.write(b"\x1f\x8b not a gzip stream, not a volume" * 10)


def _manifest() -> dict:
    """Prompts for the last N_PROMPTS studies: a box, clicks, two objects."""
    (ca, ra, _), (cb, rb, _) = BLOBS["blob_a"], BLOBS["blob_b"]
    box_a = [ca[0] - ra[0], ca[0] + ra[0], ca[1] - ra[1], ca[1] + ra[1], ca[2] - ra[2], ca[2] + ra[2]]
    ids = [f"study{k:02d}" for k in range(N_NAMES, N_NAMES + N_PROMPTS)]
    return {ids[0]: {"label": "blob_a", "boxes": [box_a]},
            ids[1]: {"label": "blob_b", "foreground": [list(cb)], "background": [[2, 2, 2]]},
            ids[2]: [{"label": "blob_a", "roi": box_a}, {"label": "blob_b", "points": [list(cb)], "point_labels": [1]}],
            ids[3]: {"label": "blob_b", "boxes": [[cb[0] - rb[0], cb[0] + rb[0], cb[1] - rb[1], cb[1] + rb[1],
                                                  cb[2] - rb[2], cb[2] + rb[2]]]}}


def _job(folder: str, out: str, **kw):
    """(job, studies) as ``python -m lib.batch --folder folder --names liver,spleen`` builds them, plus the
    manifest's prompts for its studies."""
    from lib.batch.job import BatchJob
    from lib.batch.sources import load_manifest, prompt_objects, studies_from_folder
    from lib.label_vocab import load_vocab

    weights = _weights()
    manifest = load_manifest(_manifest())
    studies = studies_from_folder(folder)
    for s in studies:
        if s.id in manifest:
            s.objects = prompt_objects(manifest[s.id])
    job = BatchJob(out=out, weights=weights, names=list(NAMES), vocab=load_vocab([weights]), threads=1, **kw)
    return job, studies


def _results(out: str) -> dict:
    """study id -> (key, label voxels) of every published result; fails on a duplicate or a stray file."""
    got = {}
    files = sorted(os.listdir(os.path.join(out, "results")))
    for rec_file in [f for f in files if f.endswith(".json")]:
        with open(os.path.join(out, "results", rec_file)) as f:
            rec = json.load(f)
        assert rec["study"] not in got, f"two results for {rec['study']}: {rec_file}"
        data = np.asarray(nib.load(os.path.join(out, "results", rec["file"])).dataobj)
        got[rec["study"]] = (rec["key"], data, rec)
    assert len(files) == 2 * len(got), f"stray files in results/: {files}"  # a label + its record each
    return got


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    _write_studies(str(root / "studies"), N_NAMES + N_PROMPTS)
    return root


@pytest.fixture(scope="module")
def local_run(work):
    """The reference: the whole job on the local backend, in this process."""
    from lib.batch.job import run_job

    job, studies = _job(str(work / "studies"), str(work / "local"))
    t0 = time.time()
    manifest = run_job(job, studies, backend="local", progress=False)
    return manifest, _results(str(work / "local")), time.time() - t0


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 96 * 2**20,
                                                       "include_dashboard": False})
    worker = c.add_node(num_cpus=1, object_store_memory=96 * 2**20)
    c.wait_for_nodes()
    try:
        yield c, worker
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def test_local_backend_writes_each_study_and_records_the_corrupt_one(local_run):
    manifest, got, _ = local_run
    by = {e["study"]: e for e in manifest["studies"]}
    assert manifest["counts"] == {"ok": N_NAMES + N_PROMPTS, "failed": 1, "missing": 0}, manifest["counts"]
    assert by["corrupt"]["status"] == "failed" and by["corrupt"]["reason"], by["corrupt"]
    prompted = set(_manifest())
    for sid, (key, data, rec) in got.items():
        assert by[sid]["key"] == key and data.shape == (48, 40, 24)
        if sid in prompted:  # objects 1..N in manifest order; the clicked / boxed blob is found
            assert rec["request"]["kind"] == "prompts" and set(np.unique(data)) <= {0, 1, 2}
            assert data.any(), f"{sid}: empty answer to its prompts"
        else:
            assert rec["request"]["kind"] == "names" and rec["label_names"] == {"liver": 5, "spleen": 1}


def test_ray_cluster_equals_local_although_a_node_is_removed(work, local_run, cluster):
    """12 studies + 1 corrupt on head + worker node (1 CPU each); the worker node is removed once it has written a
    result: the job still ends with every study written once, each equal to the local backend's."""
    from lib.batch.job import run_job

    c, worker = cluster
    out = str(work / "ray")
    job, studies = _job(str(work / "studies"), out, workers=2)
    removed = {}

    def remove_worker_node():
        deadline = time.time() + 400
        while time.time() < deadline and not removed:
            for f in glob.glob(os.path.join(out, "results", "*.json")):
                try:
                    with open(f) as fh:
                        rec = json.load(fh)
                except (OSError, ValueError):
                    continue
                if rec.get("ray_node") == worker.node_id:  # the worker node is busy with its next study
                    removed["t"] = time.time()
                    removed["done"] = len(glob.glob(os.path.join(out, "results", "*.json")))
                    c.remove_node(worker)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=remove_worker_node, daemon=True)
    killer.start()
    t0 = time.time()
    manifest = run_job(job, studies, backend="ray", ray_address=c.address, progress=False)
    took = time.time() - t0
    killer.join(5)
    assert removed, "the worker node never wrote a result: the test did not remove it mid-run"
    assert removed["done"] < N_NAMES + N_PROMPTS, "the worker node was removed after the job had finished"

    ref_manifest, ref, local_s = local_run
    assert manifest["counts"] == ref_manifest["counts"], manifest
    got = _results(out)
    assert set(got) == set(ref)
    nodes = {rec["ray_node"] for _, _, rec in got.values()}
    assert worker.node_id in nodes and len(nodes) == 2, nodes  # both nodes wrote results
    for sid, (key, data, _) in got.items():
        assert key == ref[sid][0], f"{sid}: another key on Ray"
        assert np.array_equal(data, ref[sid][1]), f"{sid}: Ray's mask differs from the local backend's"
    assert not [f for f in glob.glob(os.path.join(out, "**", "*"), recursive=True) if "tmp" in os.path.basename(f)]
    failed = json.load(open(glob.glob(os.path.join(out, "failed", "corrupt--*.json"))[0]))
    assert failed["status"] == "failed" and failed["reason"]
    n = N_NAMES + N_PROMPTS
    print(f"\nbatch of {n} studies (+1 corrupt), 2 CPU threads: local {local_s:.1f}s ({local_s / n:.2f}s/study), "
          f"Ray 2 nodes x 1 CPU with the worker node removed after {removed['done']} results {took:.1f}s "
          f"({took / n:.2f}s/study)")


def test_a_rerun_after_a_killed_run_does_only_the_missing_studies(work, local_run):
    """``python -m lib.batch`` killed after a few results; the same command again runs only the rest."""
    out = str(work / "killed")
    folder = str(work / "studies")
    env = dict(os.environ, PYTHONPATH=APP, OMP_NUM_THREADS="1")
    cmd = [PY, "-m", "lib.batch", "--folder", folder, "--names", ",".join(NAMES), "--out", out, "--threads", "1",
           "--no-progress"]
    with open(os.path.join(str(work), "killed.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=APP, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(glob.glob(os.path.join(out, "results", "*.json"))) < 3:
            assert proc.poll() is None, open(os.path.join(str(work), "killed.log")).read()[-3000:]
            assert time.time() < deadline, "no results from the first run"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = {os.path.basename(f): os.stat(f).st_mtime_ns for f in glob.glob(os.path.join(out, "results", "*"))
             if f.endswith(".json")}
    assert 3 <= len(first) < N_NAMES + N_PROMPTS  # killed half way (the prompted studies were not in this job)

    r = subprocess.run(cmd, cwd=APP, env=env, capture_output=True, text=True, timeout=600)
    summary = json.loads(r.stdout.splitlines()[0])
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]  # the corrupt study fails again
    assert summary["ran"] == N_NAMES + N_PROMPTS + 1 - len(first), summary  # the missing ones only
    assert summary["counts"] == {"ok": N_NAMES + N_PROMPTS, "failed": 1, "missing": 0}
    for name, mtime in first.items():  # the first run's results were not written again
        assert os.stat(os.path.join(out, "results", name)).st_mtime_ns == mtime
    got = _results(out)
    _, ref, _ = local_run
    for sid, (key, data, _) in got.items():
        if sid not in _manifest():  # this job has no prompts: the prompt-free studies match the reference
            assert key == ref[sid][0] and np.array_equal(data, ref[sid][1]), sid


def _rest_batch(work, tmp_path_factory, local_run, *conf: str, ray_node: bool = False) -> None:
    """``POST /batch/infer/ensam_seg`` of a real server started with ``conf``: its results folder holds the job's
    records with the keys ``lib.batch`` computes for the same files, the labels saved in the datastore equal the
    local backend's masks, and a second POST computes nothing."""
    srv_work = str(tmp_path_factory.mktemp("batch_server"))
    studies = os.path.join(srv_work, "studies")
    os.makedirs(studies)
    ids = ["study00", "study01", "study02"]
    for i in ids:  # the same files (size and time) as the reference run's
        shutil.copy2(os.path.join(str(work / "studies"), f"{i}.nii.gz"), studies)
    app_dir = _copy_app(os.path.join(srv_work, "app"))
    gen = serve(srv_work, app_dir, studies, {}, *conf)
    server = next(gen)
    try:
        body = {"labels": ",".join(NAMES), "label_tag": "batch"}
        r = requests.post(f"{server.url}/batch/infer/ensam_seg", params={"images": "all", "run_sync": "true"},
                          json=body, timeout=600)
        assert r.status_code == 200, r.text + server.log_tail()
        res = r.json()
        assert set(res) == set(ids), res
        _, ref, _ = local_run
        results = os.path.join(studies, ".ensam-batch", "results")
        records = {}
        for i in ids:
            assert res[i]["key"] == ref[i][0], f"{i}: the REST job's key differs from lib.batch's"
            rec_file = os.path.join(results, f"{i}--{res[i]['key']}.json")
            records[i] = os.stat(rec_file).st_mtime_ns
            assert bool(json.load(open(rec_file))["ray_node"]) == ray_node, "not run where --conf says"
            saved = np.asarray(nib.load(os.path.join(studies, "labels", "batch", f"{i}.nii.gz")).dataobj)
            assert np.array_equal(saved, ref[i][1]), f"{i}: the saved label differs from the local backend's"
            assert res[i]["label_names"] == {"liver": 5, "spleen": 1}

        r = requests.post(f"{server.url}/batch/infer/ensam_seg", params={"images": "all", "run_sync": "true"},
                          json=body, timeout=600)
        assert r.status_code == 200 and {i: v["key"] for i, v in r.json().items()} == {i: res[i]["key"] for i in ids}
        for i in ids:  # nothing computed again
            assert os.stat(os.path.join(results, f"{i}--{res[i]['key']}.json")).st_mtime_ns == records[i]
        assert "3/3 study02 ok (done earlier)" in server.log_tail(200), server.log_tail(40)
    finally:
        gen.close()


def test_rest_batch_route_runs_the_same_job(work, tmp_path_factory, local_run):
    """The REST route with the default settings (backend local): the same job as ``lib.batch``."""
    _rest_batch(work, tmp_path_factory, local_run)


def test_rest_batch_route_on_ray_by_its_settings(work, tmp_path_factory, cluster, local_run):
    """``--conf batch_backend ray --conf ray_address <the cluster>``: the REST batch runs on the cluster."""
    c, _ = cluster
    _rest_batch(work, tmp_path_factory, local_run, "--conf", "batch_backend", "ray", "--conf", "ray_address",
                c.address, ray_node=True)


# ---------------------------------------------------------------------------------------------------- DICOMweb
from test_orthanc_ohif import DICOM_DIR, orthanc, series  # noqa: E402,F401 (fixtures: a real Orthanc with the CT)


def test_dicomweb_series_go_back_as_dicom_seg_once(work, orthanc, series):  # noqa: F811
    """Every CT series a QIDO search finds is fetched by the worker, segmented (the same voxels as the same series
    read from its folder) and stored back as DICOM SEG in its study; the job run again after its record is lost
    stores the same SEG instance again (UIDs from the result key): still one SEG series."""
    from lib.batch.job import BatchJob, Study, run_job
    from lib.batch.sources import studies_from_dicomweb
    from lib.label_vocab import load_vocab

    weights = _weights()
    studies = studies_from_dicomweb(orthanc.dicomweb, search={"Modality": "CT"})
    assert [s.id for s in studies] == [series.series_uid]
    out = str(work / "dicomweb")
    job = BatchJob(out=out, weights=weights, names=["liver"], vocab=load_vocab([weights]), threads=1)
    manifest = run_job(job, studies, backend="local", progress=False)
    assert manifest["counts"]["ok"] == 1, manifest
    key, data, rec = _results(out)[series.series_uid]
    assert rec["dicom_seg"] and data.any(), rec
    assert orthanc.seg_series(series.study_uid) == [rec["dicom_seg"]["series"]]

    ref_out = str(work / "dicom-folder")
    run_job(BatchJob(out=ref_out, weights=weights, names=["liver"], vocab=load_vocab([weights]), threads=1),
            [Study(series.series_uid, path=DICOM_DIR)], backend="local", progress=False)
    assert np.array_equal(data, _results(ref_out)[series.series_uid][1]), "DICOMweb input != the same folder"

    os.remove(os.path.join(out, "results", f"{series.series_uid}--{key}.json"))  # as if killed before the record
    again = run_job(job, studies, backend="local", progress=False)
    assert again["ran"] == 1 and again["counts"]["ok"] == 1
    assert orthanc.seg_series(series.study_uid) == [rec["dicom_seg"]["series"]], "a second SEG series was stored"
