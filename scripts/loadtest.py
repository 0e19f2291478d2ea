"""Load generator: N concurrent Slicer-style clients on different images while a training job runs.

Each client works on its own image (``vol<i mod images>``) and label: a box (``roi``, ``reset_state``), then
corrective clicks (foreground inside the object, now and then a background click), each with its ``client_id`` and
``label`` (a Slicer session), then the next object: a new box. A monitor thread asks ``GET /info/`` every
``--info-every`` s. Meanwhile one fine-tuning job (``POST /train/ensam``) runs and publishes ``model/ensam.pt``.

Reports, per request kind (box, click, info): count, failures, p50 / p95 / max latency; and the weights switch:
every inference answer names the weights it was computed with (``weights``, ``weights_mtime_ns``); the check is that
no request failed around the publication, that each client, once it got the new weights, never got the old ones
again, and that after the job every answer uses the published file.

    # its own server (a copy of the app on synthetic volumes; nothing of the repository's model/ is written):
    PYTHONPATH=apps/ensam .venv/bin/python scripts/loadtest.py --start --clients 8 --out loadtest.json
    # or a running server whose datastore holds vol0..vol<k> synthetic volumes (see --start):
    .venv/bin/python scripts/loadtest.py --url http://127.0.0.1:8000 --clients 8

Several replicas behind nginx (docs/SCALE_OUT.md): ``--start --replicas 2`` starts two servers on ONE app (model)
folder and ONE datastore, and nginx (from the distribution) with the repository's ``deploy/nginx/ensam.conf`` (only
its addresses changed); the clients go through the proxy. ``--url`` may also name a proxy. Every answer names its
replica (``X-Ensam-Replica``): the report adds, per replica, the requests it answered and their p50 / p95.
``--threads`` is each server's ``OMP_NUM_THREADS`` (default: the cores divided among the replicas).

    # 8 clients over 2 replicas of 1 thread each, then over 1 server of 2 threads (no training: figures of the proxy)
    PYTHONPATH=apps/ensam .venv/bin/python scripts/loadtest.py --start --replicas 2 --clients 8 --train-seconds 0
    PYTHONPATH=apps/ensam .venv/bin/python scripts/loadtest.py --start --replicas 1 --clients 8 --train-seconds 0

Clicks while a fine-tuning round runs vs without (issue 29, item 3): ``--compare-training`` runs the clients twice on
the same server, first with no training (the baseline; ``--baseline-requests`` per client), then while a training job
runs (the clients stop ``--after-switch`` requests after it ended); the report's ``training_vs_baseline`` gives the
clicks' p50 / p95 in both (only the clicks sent while the job ran count for the second) and their ratios. The two
phases draw different boxes (no encoding of the first phase is reused by the second).

    PYTHONPATH=apps/ensam .venv/bin/python scripts/loadtest.py --start --clients 1 --think 1 --compare-training

Exit status 0 when every check passed (``--max-info-p95`` bounds /info too), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "apps", "ensam")
NGINX_CONF = os.path.join(ROOT, "deploy", "nginx", "ensam.conf")
if APP not in sys.path:
    sys.path.insert(0, APP)
from lib.local_server import Service, free_port, launch, server_cmd, server_env, wait_ready  # noqa: E402

# synthetic studies: two ellipsoid "organs" per volume (as tests/conftest.py), at a per-image offset
SHAPE = (64, 56, 32)
SPACING = (1.5, 1.2, 3.0)
OBJECTS = {"blob_a": ((20, 18, 12), (9, 8, 5), 900.0), "blob_b": ((44, 36, 20), (8, 9, 5), 500.0)}


def synthetic(seed: int):
    rng = np.random.default_rng(seed)
    shift = rng.integers(-3, 4, size=3)
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    img = rng.normal(0.0, 40.0, SHAPE).astype(np.float32) - 100.0
    lab = np.zeros(SHAPE, np.uint8)
    objects = {}
    for v, (name, (c, r, inten)) in enumerate(OBJECTS.items(), start=1):
        c = [int(c[a] + shift[a]) for a in range(3)]
        inside = sum(((g - c[a]) / r[a]) ** 2 for a, g in enumerate((ii, jj, kk))) <= 1.0
        img[inside] += inten
        lab[inside] = v
        objects[name] = (c, r)
    aff = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    return img, lab, aff, objects


class Server(Service):
    """A server (or the nginx proxy) this script started, with the app copy and datastore it serves."""

    def __init__(self, url: str, proc: Optional[subprocess.Popen] = None, work: str = "", app_dir: str = "",
                 studies: str = "", log: str = ""):
        super().__init__(url, proc, log)
        self.work, self.app_dir, self.studies = work, app_dir, studies

    @property
    def log(self) -> str:
        return self.log_path


def prepare_app(work: str, n_images: int, labels_for: int = 0) -> tuple:
    """An app copy (weights copied, never linked) and a datastore of ``n_images`` synthetic volumes, the first
    ``labels_for`` with a final label (for training). Returns (app_dir, studies)."""
    import nibabel as nib

    app_dir = os.path.join(work, "app")
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("__pycache__", "logs", "bin", "*.pyc"))
    for f in os.listdir(os.path.join(app_dir, "model")):  # only the shipped weights and their side files
        if not f.startswith("pretrained_"):
            p = os.path.join(app_dir, "model", f)
            os.remove(p) if os.path.isfile(p) else shutil.rmtree(p)
    studies = os.path.join(work, "studies")
    os.makedirs(studies, exist_ok=True)
    for n in range(n_images):
        img, lab, aff, _ = synthetic(n)
        nib.save(nib.Nifti1Image(img, aff), os.path.join(studies, f"vol{n}.nii.gz"))
    return app_dir, studies


def save_labels(url: str, work: str, count: int) -> None:
    """Final labels of vol0..vol<count-1> with their names (as Slicer's Submit Label sends them)."""
    import nibabel as nib

    info = {"label_info": [{"name": name, "idx": v} for v, name in enumerate(OBJECTS, start=1)]}
    for n in range(count):
        _, lab, aff, _ = synthetic(n)
        path = os.path.join(work, f"label{n}.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), path)
        with open(path, "rb") as f:
            r = requests.put(f"{url}/datastore/label", params={"image": f"vol{n}", "tag": "final"},
                             files={"label": ("label.nii.gz", f)}, data={"params": json.dumps(info)}, timeout=120)
        r.raise_for_status()


def launch_server(work: str, app_dir: str, studies: str, env_extra: Optional[dict] = None, name: str = "server",
                  threads: Optional[int] = None) -> Server:
    """One server process on ``app_dir`` / ``studies`` (not waited for: :func:`wait_server`)."""
    env = server_env(app_dir, threads, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", **(env_extra or {}))
    port, log = free_port(), os.path.join(work, f"{name}.log")
    cmd = server_cmd(app_dir, studies, port, "--conf", "labels", ",".join(OBJECTS))
    return Server(f"http://127.0.0.1:{port}", launch(cmd, log, work, env), work, app_dir, studies, log)


def wait_server(srv: Server, timeout: float = 240) -> Server:
    wait_ready(srv, "/info/", timeout, os.path.splitext(os.path.basename(srv.log_path))[0] or "server")
    return srv


def start_server(work: str, n_images: int, labels_for: int = 2, env_extra: Optional[dict] = None,
                 timeout: float = 240, threads: Optional[int] = None) -> Server:
    app_dir, studies = prepare_app(work, n_images, labels_for)
    srv = wait_server(launch_server(work, app_dir, studies, env_extra, threads=threads), timeout)
    try:
        save_labels(srv.url, work, labels_for)
    except Exception:
        srv.stop()
        raise
    return srv


def _nginx() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "")
    if not path:
        raise SystemExit("nginx is not installed (make services, or apt-get install nginx)")
    return path


def nginx_config(work: str, listen: int, ports: List[int]) -> str:
    """deploy/nginx/ensam.conf with these replicas' loopback ports (one ``server`` line per replica in each upstream)
    and ``listen`` port, inside a minimal main config of its own (pid, logs and temporary files in ``work``)."""
    import pwd

    with open(NGINX_CONF) as f:
        text = f.read()

    def upstream(m):  # the replica lines of an upstream block, one per port, with the block's own parameters
        lines = m.group(0).splitlines(keepends=True)
        servers = [ln for ln in lines if re.match(r"\s*server 127\.0\.0\.1:800\d\b", ln)]
        first, others = servers[0], servers[1:]
        out, done = [], False
        for ln in lines:
            if ln in servers:
                if not done:
                    for k, port in enumerate(ports):
                        model = first if k == 0 else (others[0] if others else first)
                        out.append(re.sub(r"127\.0\.0\.1:800\d", f"127.0.0.1:{port}", model))
                    done = True
                continue
            out.append(ln)
        return "".join(out)

    text = re.sub(r"upstream \w+ \{.*?\}", upstream, text, flags=re.S)
    text, n = re.subn(r"listen 8080;", f"listen 127.0.0.1:{listen};", text)
    if n != 1:
        raise RuntimeError(f"{NGINX_CONF}: one 'listen 8080;' expected")
    site = os.path.join(work, "nginx-ensam.conf")
    with open(site, "w") as f:
        f.write(text)
    tmp = os.path.join(work, "nginx-tmp")
    os.makedirs(tmp, exist_ok=True)
    user = f"user {pwd.getpwuid(os.getuid()).pw_name};\n" if os.geteuid() == 0 else ""
    main_conf = os.path.join(work, "nginx.conf")
    with open(main_conf, "w") as f:
        f.write(f"{user}worker_processes 1;\npid {work}/nginx.pid;\nerror_log {work}/nginx-error.log info;\n"
                f"events {{ worker_connections 256; }}\nhttp {{\n    access_log {work}/nginx-access.log;\n"
                + "".join(f"    {k}_temp_path {tmp}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                         "scgi"))
                + f"    include {site};\n}}\n")
    return main_conf


def start_cluster(work: str, n_images: int, replicas: int, labels_for: int = 2, threads: Optional[int] = None,
                  timeout: float = 300) -> tuple:
    """``replicas`` servers on ONE app folder and ONE datastore, behind nginx. Returns (proxy, [servers])."""
    app_dir, studies = prepare_app(work, n_images, labels_for)
    servers: List[Server] = []
    try:
        for k in range(replicas):
            servers.append(launch_server(work, app_dir, studies, name=f"replica{k}", threads=threads))
            time.sleep(3.0)  # the first creates the datastore index; the others read it
        for srv in servers:
            wait_server(srv, timeout)
        nginx, listen = _nginx(), free_port()
        conf = nginx_config(work, listen, [int(srv.url.rsplit(":", 1)[1]) for srv in servers])
        err = os.path.join(work, "nginx-error.log")
        check = subprocess.run([nginx, "-t", "-c", conf, "-e", err], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t: {check.stderr}")
        log = os.path.join(work, "nginx.log")
        proc = launch([nginx, "-c", conf, "-e", err, "-g", "daemon off;"], log, work)
        proxy = wait_server(Server(f"http://127.0.0.1:{listen}", proc, work, app_dir, studies, log), 30)
        save_labels(proxy.url, work, labels_for)
        return proxy, servers
    except Exception:
        for srv in servers:
            srv.stop()
        raise


# ------------------------------------------------------------------------------------------------- the clients
@dataclass
class Record:
    kind: str
    client: int
    t_start: float
    latency: float
    status: int
    weights: Optional[tuple] = None
    error: str = ""
    replica: str = ""  # the X-Ensam-Replica header (behind nginx): which replica answered


@dataclass
class Shared:
    records: List[Record] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, rec: Record):
        with self.lock:
            self.records.append(rec)


def _infer(url, image, params, timeout):
    return requests.post(f"{url}/infer/ensam", params={"image": image, "output": "json"},
                         data={"params": json.dumps(params)}, timeout=timeout)


def _replica(resp) -> str:
    addr = resp.headers.get("X-Ensam-Replica", "")
    return addr.split(",")[-1].strip()  # after a retry nginx lists every replica it tried


def client(url: str, k: int, n_images: int, clicks: int, shared: Shared, timeout: float, min_requests: int,
           done_training: threading.Event, after_switch: int, think: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(100 + k + 1000 * seed)
    image = f"vol{k % n_images}"
    _, _, _, objects = synthetic(k % n_images)
    names = list(objects)
    n, seen_after = 0, 0
    while not shared.stop.is_set():
        name = names[(n // (clicks + 1)) % len(names)]
        c, r = objects[name]
        base = {"client_id": f"load{k}", "label": name}
        step = n % (clicks + 1)
        if step == 0:  # a box around the object (Slicer's ROI), a new segment
            box = []
            for a in range(3):
                lo, hi = c[a] - r[a] - int(rng.integers(0, 3)), c[a] + r[a] + int(rng.integers(0, 3))
                box += [max(lo, 0), min(hi, SHAPE[a] - 1)]
            params, kind = dict(base, roi=box, reset_state=True), "box"
        else:
            if rng.random() < 0.25:  # a background click just outside the object
                p = [min(max(c[a] + (r[a] + 2) * (1 if rng.random() < 0.5 else -1), 0), SHAPE[a] - 1)
                     for a in range(3)]
                params = dict(base, background=[p])
            else:
                p = [int(c[a] + rng.integers(-r[a] // 2, r[a] // 2 + 1)) for a in range(3)]
                params = dict(base, foreground=[p])
            kind = "click"
        t0 = time.time()
        try:
            resp = _infer(url, image, params, timeout)
            lat = time.time() - t0
            w = None
            if resp.status_code == 200:
                j = resp.json()
                w = (j.get("weights"), j.get("weights_mtime_ns") or j.get("weights_mtime"))
            shared.add(Record(kind, k, t0, lat, resp.status_code, w, "" if resp.status_code == 200 else
                              resp.text[:300], _replica(resp)))
        except requests.RequestException as e:
            shared.add(Record(kind, k, t0, time.time() - t0, 0, None, f"{type(e).__name__}: {e}"))
        n += 1
        if think > 0:  # the user looks at the result before the next click
            time.sleep(float(rng.uniform(0.5, 1.5)) * think)
        if done_training.is_set():
            seen_after += 1
        if n >= min_requests and done_training.is_set() and seen_after >= after_switch:
            return


def monitor(url: str, shared: Shared, every: float, timeout: float):
    while not shared.stop.is_set():
        t0 = time.time()
        try:
            r = requests.get(f"{url}/info/", timeout=timeout)
            shared.add(Record("info", -1, t0, time.time() - t0, r.status_code))
        except requests.RequestException as e:
            shared.add(Record("info", -1, t0, time.time() - t0, 0, None, str(e)))
        time.sleep(max(0.0, every - (time.time() - t0)))


def train(url: str, body: dict, done: threading.Event, result: dict, deadline: float):
    t0 = result["t_start"] = time.time()
    r = requests.post(f"{url}/train/ensam", json=body, timeout=60)
    result["start_status"] = r.status_code
    result["start_answer"] = r.text[:300]
    if r.status_code != 200:
        done.set()
        return
    while time.time() < deadline:
        time.sleep(1.0)
        try:
            s = requests.get(f"{url}/train/", timeout=30).json()
        except (requests.RequestException, ValueError):
            continue
        if s.get("status") in ("DONE", "ERROR", "STOPPED"):
            result["status"] = s.get("status")
            result["seconds"] = round(time.time() - t0, 1)
            result["details_tail"] = (s.get("details") or [])[-3:]
            break
    else:
        result["status"] = "TIMEOUT"
    result["t_end"] = time.time()
    done.set()


def _stats(rs: List[Record]) -> dict:
    ok = np.array([r.latency for r in rs if r.status == 200])
    return {"requests": len(rs), "failed": sum(r.status != 200 for r in rs),
            "p50_s": round(float(np.percentile(ok, 50)), 3) if len(ok) else None,
            "p95_s": round(float(np.percentile(ok, 95)), 3) if len(ok) else None,
            "max_s": round(float(ok.max()), 3) if len(ok) else None}


def summarise(records: List[Record]) -> dict:
    return {kind: _stats([r for r in records if r.kind == kind]) for kind in sorted({r.kind for r in records})}


def by_replica(records: List[Record]) -> dict:
    """Per replica (``X-Ensam-Replica``; empty without a proxy): the inferences (boxes and clicks) it answered,
    their latencies, and the clients whose images it served."""
    out = {}
    infer = [r for r in records if r.kind in ("box", "click")]
    for addr in sorted({r.replica for r in infer}):
        rs = [r for r in infer if r.replica == addr]
        out[addr or "(no header)"] = dict(_stats(rs), clients=sorted({r.client for r in rs}))
    return out


def check_switch(records: List[Record], published: Optional[tuple]) -> dict:
    """Per client (its requests run one after the other), the weights never go back once new ones were used."""
    problems = []
    versions = set()
    for k in sorted({r.client for r in records if r.client >= 0}):
        seq = [r.weights for r in sorted((r for r in records if r.client == k and r.weights), key=lambda r: r.t_start)]
        versions.update(seq)
        order = []
        for w in seq:
            if not order or order[-1] != w:
                order.append(w)
        if len(order) != len(set(order)):
            problems.append(f"client {k} went back to older weights: {order}")
    last = {}
    for r in sorted((r for r in records if r.weights), key=lambda r: r.t_start):
        last[r.client] = r.weights
    if published and any(w != published for w in last.values()):
        problems.append(f"after training, some client's last answer was not from the published weights "
                        f"{published}: {last}")
    return {"weights_versions_seen": sorted(str(v) for v in versions), "problems": problems}


def run(url: str, clients: int = 8, n_images: int = 8, clicks: int = 5, min_requests: int = 12,
        after_switch: int = 3, train_body: Optional[dict] = None, info_every: float = 0.25, timeout: float = 300,
        deadline_s: float = 1800, app_dir: Optional[str] = None, think: float = 0.0, seed: int = 0) -> dict:
    shared = Shared()
    done = threading.Event()
    train_result: dict = {}
    threads = []
    t0 = time.time()
    mon = threading.Thread(target=monitor, args=(url, shared, info_every, timeout), daemon=True)
    mon.start()
    if train_body is not None:
        tt = threading.Thread(target=train, args=(url, train_body, done, train_result, t0 + deadline_s), daemon=True)
        tt.start()
    else:
        done.set()
    for k in range(clients):
        t = threading.Thread(target=client, args=(url, k, n_images, clicks, shared, timeout, min_requests, done,
                                                  after_switch if train_body is not None else 0, think, seed),
                             daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(max(1.0, t0 + deadline_s - time.time()))
    shared.stop.set()
    mon.join(10)
    wall = time.time() - t0
    published = None
    if app_dir and os.path.exists(os.path.join(app_dir, "model", "ensam.pt")):
        st = os.stat(os.path.join(app_dir, "model", "ensam.pt"))
        published = ("ensam.pt", st.st_mtime_ns)
    records = list(shared.records)
    # weights_mtime_ns is the exact st_mtime_ns of the file the engine read: compared as is
    switch = check_switch(records, published if train_body is not None else None)
    summary = summarise(records)
    failed = [r for r in records if r.status != 200]
    out = {"clients": clients, "images": n_images, "think_s": think, "wall_s": round(wall, 1), "by_kind": summary,
           "by_replica": by_replica(records), "failed_requests": len(failed),
           "failures": [(r.kind, r.status, r.error) for r in failed[:10]], "training": train_result,
           "weights_switch": switch, "threads_unfinished": sum(t.is_alive() for t in threads),
           "load_average": [round(x, 2) for x in os.getloadavg()]}
    if train_result.get("t_start") and train_result.get("t_end"):  # the inferences sent while the job ran
        t0_train, t1_train = train_result["t_start"], train_result["t_end"]
        during = [r for r in records if r.kind in ("box", "click") and t0_train <= r.t_start < t1_train]
        out["during_training"] = {kind: _stats([r for r in during if r.kind == kind]) for kind in ("box", "click")}
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 2) if a is not None and b else None


def compare_training(url: str, a, n_images: int, body: dict, app_dir: Optional[str]) -> dict:
    """Issue 29, item 3: the same clients first with no training (baseline), then while a training job runs."""
    base = run(url, a.clients, n_images, a.clicks, a.baseline_requests, 0, None, a.info_every,
               deadline_s=a.deadline, app_dir=app_dir, think=a.think, seed=1)
    loaded = run(url, a.clients, n_images, a.clicks, a.min_requests, a.after_switch, body, a.info_every,
                 deadline_s=a.deadline, app_dir=app_dir, think=a.think, seed=2)
    b, d = base["by_kind"].get("click", {}), loaded.get("during_training", {}).get("click", {})
    bb, db = base["by_kind"].get("box", {}), loaded.get("during_training", {}).get("box", {})
    summary = {"baseline_click": b, "during_training_click": d, "baseline_box": bb, "during_training_box": db,
               "click_p50_ratio": _ratio(d.get("p50_s"), b.get("p50_s")),
               "click_p95_ratio": _ratio(d.get("p95_s"), b.get("p95_s")),
               "box_p50_ratio": _ratio(db.get("p50_s"), bb.get("p50_s")),
               "training_seconds": loaded["training"].get("seconds"),
               "training_status": loaded["training"].get("status")}
    rep = dict(loaded, baseline=base, training_vs_baseline=summary)
    rep["failed_requests"] = base["failed_requests"] + loaded["failed_requests"]
    rep["threads_unfinished"] = base["threads_unfinished"] + loaded["threads_unfinished"]
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server or proxy (its datastore must hold vol0.. as --start makes them)")
    ap.add_argument("--start", action="store_true", help="start a server of its own on synthetic volumes")
    ap.add_argument("--replicas", type=int, default=0,
                    help="with --start: this many servers behind nginx (deploy/nginx/ensam.conf); 0: one server, "
                         "no proxy")
    ap.add_argument("--threads", type=int, default=0,
                    help="with --start: OMP_NUM_THREADS of each server (default: the cores divided among them)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--images", type=int, default=0, help="synthetic images (default: one per client, 2 at least)")
    ap.add_argument("--clicks", type=int, default=5, help="clicks after each box")
    ap.add_argument("--min-requests", type=int, default=12, help="per client, at least")
    ap.add_argument("--after-switch", type=int, default=3, help="requests per client after training ended")
    ap.add_argument("--train-seconds", type=float, default=60, help="fine-tuning budget (0: no training)")
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--compare-training", action="store_true",
                    help="first a baseline without training, then with it: the clicks' latency ratio")
    ap.add_argument("--baseline-requests", type=int, default=12, help="per client, in the baseline phase")
    ap.add_argument("--think", type=float, default=0.0, help="mean pause (s) of a client between its requests")
    ap.add_argument("--info-every", type=float, default=0.25)
    ap.add_argument("--max-info-p95", type=float, default=0.5, help="fail when /info's p95 is above (s)")
    ap.add_argument("--deadline", type=float, default=1800, help="stop the clients after this many seconds")
    ap.add_argument("--out", help="write the report (JSON) here")
    ap.add_argument("--keep", action="store_true", help="keep the --start work folder")
    a = ap.parse_args(argv)
    n_images = a.images or max(a.clients, 2)  # two at least: --start labels two for the training job
    if a.compare_training and a.train_seconds <= 0:
        ap.error("--compare-training needs a training budget (--train-seconds > 0)")
    servers: List[Server] = []
    proxy = None
    work = None
    threads = a.threads or max(1, (os.cpu_count() or 1) // max(1, a.replicas))
    if a.start:
        work = tempfile.mkdtemp(prefix="ensam_load_")
        if a.replicas > 0:
            proxy, servers = start_cluster(work, n_images, a.replicas, labels_for=2, threads=threads)
            url, app_dir = proxy.url, proxy.app_dir
        else:
            servers = [start_server(work, n_images, labels_for=2, threads=threads)]
            url, app_dir = servers[0].url, servers[0].app_dir
    elif a.url:
        url, app_dir = a.url.rstrip("/"), None
    else:
        ap.error("--url or --start")
    body = None
    if a.train_seconds > 0:
        body = {"device": "cpu", "max_seconds": a.train_seconds, "max_steps": a.train_steps, "val_split": 0.5,
                "labels": "blob_a", "val_every": max(1, a.train_steps // 2) if a.train_steps else 0}
    try:
        if a.compare_training:
            rep = compare_training(url, a, n_images, body, app_dir)
        else:
            rep = run(url, a.clients, n_images, a.clicks, a.min_requests, a.after_switch, body, a.info_every,
                      deadline_s=a.deadline, app_dir=app_dir, think=a.think)
    finally:
        for srv in ([proxy] if proxy else []) + servers:
            srv.stop()
        if work and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    rep["cpu_count"] = os.cpu_count()
    if a.start:
        rep["servers"] = {"replicas": a.replicas, "proxy": bool(proxy), "threads_per_server": threads}
    info = rep["by_kind"].get("info", {})
    ok = (rep["failed_requests"] == 0 and not rep["weights_switch"]["problems"] and not rep["threads_unfinished"]
          and (info.get("p95_s") is None or info["p95_s"] <= a.max_info_p95)
          and (body is None or rep["training"].get("status") == "DONE"))
    rep["ok"] = bool(ok)
    text = json.dumps(rep, indent=1, default=str)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
