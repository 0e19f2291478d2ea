"""Several server replicas behind a real nginx (issue 30, item 2), all on loopback ports: two monailabel servers on
ONE datastore folder and ONE app (model) folder, nginx from the distribution with the repository's
``deploy/nginx/ensam.conf`` (only its addresses changed).

* one client's clicks on one image stay on one replica, and undo works through the proxy;
* a label saved through one replica is listed by the other;
* weights published by a training job (run on one replica) are served by both (``weights_version``);
* a killed replica: continuing its session is a clear 409 (never a mask without the previous result), a new session
  and the other images go on being served.
"""

from __future__ import annotations

import hashlib
import json
import importlib.util
import os
import sys
import shutil
import signal
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import ROOT, Service, _copy_app, free_port, launch, server_cmd, server_env, wait_ready

TIMEOUT = 180
SAMPLE = os.path.join(ROOT, "sample-datasets", "studies")
N_IDS = 16  # copies of one small CT under as many ids: some hash to each replica
CLICK = [[60, 50, 15]]


def _nginx() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not path:
        pytest.skip("nginx is not installed (make services installs it)")
    return path


def _nginx_conf(work: str, listen: int, replicas: list) -> str:
    """The repository's config with this test's ports, inside a minimal main config of its own: the load
    generator's renderer (``scripts/loadtest.py`` ``nginx_config``), one place for both."""
    spec = importlib.util.spec_from_file_location("loadtest", os.path.join(ROOT, "scripts", "loadtest.py"))
    loadtest = sys.modules.setdefault("loadtest", importlib.util.module_from_spec(spec))  # its dataclasses look
    spec.loader.exec_module(loadtest)  # their module up
    return loadtest.nginx_config(work, listen, list(replicas))


class Cluster:
    def __init__(self, work, app_dir, studies, replicas, proxy, proxy_url):
        self.work, self.app_dir, self.studies = work, app_dir, studies
        self.replicas = replicas  # [Service, Service]
        self.proxy = proxy
        self.url = proxy_url
        self.state: dict = {}

    def by_addr(self, addr: str) -> Service:
        return next(r for r in self.replicas if r.url.endswith(addr))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nginx = _nginx()
    work = str(tmp_path_factory.mktemp("replicas"))
    app_dir = _copy_app(os.path.join(work, "app"))  # ONE model folder for both replicas
    studies = os.path.join(work, "studies")  # ONE datastore folder
    os.makedirs(studies)
    for n in range(N_IDS):
        shutil.copyfile(os.path.join(SAMPLE, "ct_small.nii.gz"), os.path.join(studies, f"ct{n:02d}.nii.gz"))
    ports = [free_port(), free_port()]
    replicas = []
    try:
        for k, port in enumerate(ports):
            env = server_env(app_dir, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", OMP_NUM_THREADS="1")
            log = os.path.join(work, f"replica{k}.log")
            replicas.append(Service(f"http://127.0.0.1:{port}",
                                    launch(server_cmd(app_dir, studies, port), log, work, env), log))
            time.sleep(3.0)  # the first one creates the datastore index; the second reads it
        for k, r in enumerate(replicas):
            wait_ready(r, "/info/", 300, f"replica {k}")
        listen = free_port()
        conf = _nginx_conf(work, listen, ports)
        check = subprocess.run([nginx, "-t", "-c", conf, "-e", os.path.join(work, "nginx-error.log")],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        log = os.path.join(work, "nginx.log")
        proxy = Service(f"http://127.0.0.1:{listen}",
                        launch([nginx, "-c", conf, "-e", os.path.join(work, "nginx-error.log"), "-g", "daemon off;"],
                               log, work), log)
        wait_ready(proxy, "/info/", 30, "nginx")
        yield Cluster(work, app_dir, studies, replicas, proxy, proxy.url)
    finally:
        for svc in [locals().get("proxy")] + replicas:
            if svc is not None:
                svc.stop()


def _replica(resp) -> str:
    addr = resp.headers.get("X-Ensam-Replica", "")
    assert addr, f"no X-Ensam-Replica header: {resp.status_code} {resp.text[:200]}"
    return addr.split(",")[-1].strip()  # after a retry nginx lists every replica tried


def _click(url, image, params, output="all"):
    return requests.post(f"{url}/infer/ensam", params={"image": image, "output": output},
                         data={"params": json.dumps(params)}, timeout=TIMEOUT)


def _answer(resp):
    """(mask, params) of an ``output=all`` answer."""
    from lib.io.infer_answer import read_answer

    vol, params = read_answer(resp.content, resp.headers.get("content-type", ""))
    return np.asarray(vol.array), params


def _ids_per_replica(cluster) -> dict:
    """replica address -> image ids that nginx sends to it (cheap requests about each id: GET its image)."""
    seen: dict = {}
    for n in range(N_IDS):
        image_id = f"ct{n:02d}"
        r = requests.get(f"{cluster.url}/datastore/image", params={"image": image_id}, timeout=60)
        assert r.status_code == 200, r.text[:300]
        seen.setdefault(_replica(r), []).append(image_id)
    return seen


def test_one_images_clicks_stay_on_one_replica_and_undo_works_through_the_proxy(cluster):
    per = _ids_per_replica(cluster)
    assert len(per) == 2, f"every one of {N_IDS} ids went to one replica: {per}"
    for addr, ids in per.items():  # the same id always goes to the same replica
        again = requests.get(f"{cluster.url}/datastore/image", params={"image": ids[0]}, timeout=60)
        assert _replica(again) == addr
    addr_a, addr_b = sorted(per)
    a, b = per[addr_a][0], per[addr_b][0]
    cluster.state.update(a=a, b=b, addr_a=addr_a, addr_b=addr_b)

    base = {"client_id": "annotator-1", "label": "organ"}
    r1 = _click(cluster.url, a, dict(base, foreground=CLICK))
    assert r1.status_code == 200, r1.text[:500]
    m1, p1 = _answer(r1)
    r2 = _click(cluster.url, a, dict(base, foreground=CLICK, background=[[60, 30, 15]], session_step=1))
    assert r2.status_code == 200, r2.text[:500]
    m2, p2 = _answer(r2)
    assert p1["session"]["step"] == 1 and p2["session"]["step"] == 2 and p2["previous_mask"] is True
    assert _replica(r1) == _replica(r2) == addr_a
    assert m1.any() and not np.array_equal(m1, m2)
    u = _click(cluster.url, a, dict(base, undo=True))
    assert u.status_code == 200 and _replica(u) == addr_a, u.text[:500]
    mu, pu = _answer(u)
    assert np.array_equal(mu, m1) and pu["session"]["step"] == 1
    r3 = _click(cluster.url, a, dict(base, foreground=CLICK, background=[[60, 30, 15]], session_step=1))
    assert r3.status_code == 200 and _answer(r3)[1]["session"]["step"] == 2
    cluster.state["mask_a"] = m1


def test_a_label_saved_through_one_replica_is_listed_by_the_other(cluster):
    a, addr_a, addr_b = cluster.state["a"], cluster.state["addr_a"], cluster.state["addr_b"]
    label = (cluster.state["mask_a"] > 0).astype(np.uint8)
    ref = nib.load(os.path.join(cluster.studies, f"{a}.nii.gz"))
    path = os.path.join(cluster.work, "label.nii.gz")
    nib.save(nib.Nifti1Image(label, ref.affine), path)
    with open(path, "rb") as f:
        r = requests.put(f"{cluster.url}/datastore/label", params={"image": a, "tag": "final"},
                         files={"label": ("label.nii.gz", f)},
                         data={"params": json.dumps({"label_info": [{"name": "organ", "idx": 1}]})}, timeout=120)
    assert r.status_code == 200 and _replica(r) == addr_a, r.text[:500]
    other = cluster.by_addr(addr_b)
    listing = requests.get(f"{other.url}/datastore/", params={"output": "all"}, timeout=60).json()
    assert listing["objects"][a]["labels"].get("final"), listing["objects"][a]
    got = requests.get(f"{other.url}/datastore/label", params={"label": a, "tag": "final"}, timeout=60)
    assert got.status_code == 200 and len(got.content) > 0


def _sha16(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def test_weights_published_by_a_training_job_are_served_by_both_replicas(cluster):
    a, b = cluster.state["a"], cluster.state["b"]
    before = {r.url: requests.get(f"{r.url}/info/", timeout=60).json()["weights"]["ensam"] for r in cluster.replicas}
    assert len({w["weights_version"] for w in before.values()}) == 1, before  # the same shipped weights
    r = requests.post(f"{cluster.url}/train/ensam", json={
        "device": "cpu", "max_seconds": 0, "max_steps": 1, "val_split": 0, "labels": "organ", "concept": False,
        "rehearsal": 0}, timeout=120)
    assert r.status_code == 200, r.text[:500]
    trainer = _replica(r)
    deadline = time.time() + 600
    while True:
        st = requests.get(f"{cluster.url}/train/", timeout=60)
        assert _replica(st) == trainer  # status from where it runs
        if st.status_code == 200 and st.json().get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        assert time.time() < deadline, "training did not finish in 600 s"
        time.sleep(2.0)
    assert st.json()["status"] == "DONE", "\n".join(st.json().get("details", []))
    published = os.path.join(cluster.app_dir, "model", "ensam.pt")
    version = _sha16(published)
    assert version != before[cluster.replicas[0].url]["weights_version"]
    for rep in cluster.replicas:  # /info of each replica names the new weights
        w = requests.get(f"{rep.url}/info/", timeout=60).json()["weights"]["ensam"]
        assert w["weights"] == "ensam.pt" and w["weights_version"] == version, (rep.url, w)
    for image, addr in ((a, cluster.state["addr_a"]), (b, cluster.state["addr_b"])):  # answers computed with them
        r = _click(cluster.url, image, {"foreground": CLICK, "reset_state": True}, output="json")
        assert r.status_code == 200 and _replica(r) == addr, r.text[:500]
        assert r.json()["weights"] == "ensam.pt" and r.json()["weights_version"] == version, r.json()


def test_a_killed_replica_gives_a_clear_error_and_the_other_keeps_serving(cluster):
    a, b = cluster.state["a"], cluster.state["b"]
    base = {"client_id": "annotator-1", "label": "organ"}
    # the session of image a: step 2 on its replica (test 1), then a new one started by test 3's reset click
    r = _click(cluster.url, a, dict(base, foreground=CLICK))
    assert r.status_code == 200
    step = _answer(r)[1]["session"]["step"]
    dead = cluster.by_addr(cluster.state["addr_a"])
    os.killpg(dead.proc.pid, signal.SIGKILL)
    dead.proc.wait(timeout=30)

    r = _click(cluster.url, a, dict(base, foreground=CLICK, background=[[60, 30, 15]], session_step=step))
    assert r.status_code == 409, (r.status_code, r.text[:500])
    detail = r.json()["detail"]
    assert "session unknown or expired" in detail and "reset_state" in detail, detail
    assert _replica(r) == cluster.state["addr_b"]
    u = _click(cluster.url, a, dict(base, undo=True))
    assert u.status_code == 409, (u.status_code, u.text[:500])  # nothing to undo there: never an old mask
    r = _click(cluster.url, a, dict(base, foreground=CLICK, reset_state=True))
    assert r.status_code == 200 and _answer(r)[1]["session"]["step"] == 1  # a new session on the other replica
    r = _click(cluster.url, b, {"foreground": CLICK}, output="json")
    assert r.status_code == 200 and _replica(r) == cluster.state["addr_b"]
    assert requests.get(f"{cluster.url}/info/", timeout=60).status_code == 200
