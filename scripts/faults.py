"""Fault injection: SIGKILL the server at random moments during label saves and weight publications, and a training
process mid-run; after each kill, check what is on disk, restart the server and check that it serves.

After every server kill:
* every saved label file is one of the versions that were uploaded for it, byte for byte (never truncated);
* the datastore index (``datastore_v2.json``) parses, and after the restart ``/datastore`` lists exactly the
  labels that are on disk;
* the weights (``model/ensam.pt``, published through ``PUT /model/ensam``) load with ``lib.weights.load_artefact``
  and are one of the uploaded versions; the server restarts, answers ``/info`` and segments with them.
After every training-process kill (``POST /train/ensam``, then SIGKILL of the training subprocess): the server
still serves, the weights load, ``train_stats.json`` parses, and the next training request is accepted.

    PYTHONPATH=apps/ensam .venv/bin/python scripts/faults.py --kills 100 --train-kills 5 --out faults.json

Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "apps", "ensam"))

import loadtest as L  # noqa: E402  (synthetic studies, server start)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def label_versions(work: str, n_images: int) -> dict:
    """image id -> {sha256: bytes} of two different labels (all objects; only the first object)."""
    import nibabel as nib

    out = {}
    for n in range(n_images):
        _, lab, aff, _ = L.synthetic(n)
        versions = {}
        for k, arr in enumerate((lab, (lab == 1).astype(lab.dtype))):
            p = os.path.join(work, f"v{n}_{k}.nii.gz")
            nib.save(nib.Nifti1Image(arr, aff), p)
            with open(p, "rb") as f:
                b = f.read()
            versions[sha(b)] = b
        out[f"vol{n}"] = versions
    return out


def weight_versions(work: str, shipped: str) -> dict:
    """sha256 of the state -> artefact file bytes, for two weights versions (the shipped ones, and a perturbed copy)."""
    import torch

    from lib.weights import load_artefact, save_artefact

    art = load_artefact(shipped)
    out = {}
    for k in range(2):
        sd = {n: (t + 0.001 * k if t.is_floating_point() else t) for n, t in art.state_dict.items()}
        p = os.path.join(work, f"w{k}.pt")
        save_artefact(p, sd, dict(art.meta, version=k), copies=False)
        with open(p, "rb") as f:
            out[k] = f.read()
    del torch
    return out


def state_version(path: str):
    """The ``version`` of an artefact's meta (what PUT /model kept; "trained" for weights a training published), or
    raise when it does not load."""
    from lib.weights import load_artefact

    art = load_artefact(path)
    return "trained" if "labels_trained" in art.meta else art.meta.get("version")


def _find_training(server_pid: int):
    """pids of the training subprocesses (monailabel runs a train request as a child process of the server)."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if "monailabel.interfaces.utils.app" in cmd and " train" in cmd:
            # a descendant of the server
            q, seen = ppid, 0
            while q > 1 and seen < 20:
                if q == server_pid:
                    pids.append(int(p))
                    break
                try:
                    with open(f"/proc/{q}/stat") as f:
                        q = int(f.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    break
                seen += 1
    return pids



def json_problems(path: str, what: str) -> list:
    """[] when ``path`` is absent or parses as JSON, else the one problem found."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            json.load(f)
    except ValueError as e:
        return [f"{what} does not parse: {e}"]
    return []

class Rig:
    def __init__(self, work: str, n_images: int):
        self.work = work
        self.n_images = n_images
        self.app_dir, self.studies = L.prepare_app(work, n_images)
        self.labels = label_versions(work, n_images)
        shipped = os.path.join(self.app_dir, "model", "pretrained_ensam.pt")
        self.weights = weight_versions(work, shipped)
        self.srv = None
        self.starts = 0

    def start(self):
        """A fresh server on the same app copy and datastore; seconds until it answers /info/."""
        t0 = time.time()
        self.srv = L.launch_server(self.work, self.app_dir, self.studies, name=f"server{self.starts}")
        self.starts += 1
        L.wait_server(self.srv, timeout=240)
        return time.time() - t0

    def kill(self):
        os.killpg(self.srv.proc.pid, signal.SIGKILL)
        self.srv.proc.wait()

    # ---- writers ------------------------------------------------------------------------------------------
    def label_writer(self, stop: threading.Event, seed: int, counts: dict):
        rng = random.Random(seed)
        info = {"label_info": [{"name": n, "idx": v} for v, n in enumerate(L.OBJECTS, start=1)]}
        while not stop.is_set():
            image = f"vol{rng.randrange(self.n_images)}"
            data = rng.choice(list(self.labels[image].values()))
            try:
                r = requests.put(f"{self.srv.url}/datastore/label", params={"image": image, "tag": "final"},
                                 files={"label": ("label.nii.gz", data)}, data={"params": json.dumps(info)},
                                 timeout=30)
                counts["label_ok" if r.status_code == 200 else f"label_{r.status_code}"] = \
                    counts.get("label_ok" if r.status_code == 200 else f"label_{r.status_code}", 0) + 1
            except requests.RequestException:
                return

    def weights_writer(self, stop: threading.Event, seed: int, counts: dict):
        rng = random.Random(seed)
        while not stop.is_set():
            k = rng.randrange(2)
            try:
                r = requests.put(f"{self.srv.url}/model/ensam", files={"file": (f"w{k}.pt", self.weights[k])},
                                 timeout=60)
                key = "weights_ok" if r.status_code == 200 else f"weights_{r.status_code}"
                counts[key] = counts.get(key, 0) + 1
            except requests.RequestException:
                return

    # ---- checks -------------------------------------------------------------------------------------------
    def check_disk(self) -> list:
        problems = []
        final = os.path.join(self.studies, "labels", "final")
        for image, versions in self.labels.items():
            p = os.path.join(final, f"{image}.nii.gz")
            if os.path.exists(p):
                with open(p, "rb") as f:
                    if sha(f.read()) not in versions:
                        problems.append(f"label of {image} is none of the uploaded versions "
                                        f"({os.path.getsize(p)} bytes)")
        problems += json_problems(os.path.join(self.studies, "datastore_v2.json"), "datastore index")
        w = os.path.join(self.app_dir, "model", "ensam.pt")
        if os.path.exists(w):
            try:
                if state_version(w) not in (0, 1, "trained"):
                    problems.append("ensam.pt is none of the uploaded weights")
            except Exception as e:  # noqa: BLE001
                problems.append(f"ensam.pt does not load: {type(e).__name__}: {e}")
        return problems

    def check_served(self) -> list:
        problems = []
        url = self.srv.url
        if requests.get(f"{url}/info/", timeout=30).status_code != 200:
            problems.append("/info failed after restart")
        objs = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
        final = os.path.join(self.studies, "labels", "final")
        on_disk = {f[:-len(".nii.gz")] for f in os.listdir(final)} if os.path.isdir(final) else set()
        listed = {i for i, o in objs.items() if "final" in (o.get("labels") or {})}
        if listed != on_disk:
            problems.append(f"index inconsistent: listed {sorted(listed)} vs on disk {sorted(on_disk)}")
        for image in sorted(on_disk):
            r = requests.get(f"{url}/datastore/label", params={"label": image, "tag": "final"}, timeout=30)
            if r.status_code != 200 or sha(r.content) not in self.labels[image]:
                problems.append(f"GET label {image}: {r.status_code}, not an uploaded version")
        r = requests.post(f"{url}/infer/ensam", params={"image": "vol0", "output": "json"},
                          data={"params": json.dumps({"foreground": [list(L.synthetic(0)[3]["blob_a"][0])]})},
                          timeout=120)
        if r.status_code != 200:
            problems.append(f"inference after restart: {r.status_code} {r.text[:200]}")
        leftovers = [f for d, _, fs in os.walk(self.studies) for f in fs if f.endswith(".ensam-tmp")]
        if leftovers:
            problems.append(f"temporary files left in the datastore after restart: {leftovers}")
        return problems


def run(kills: int = 100, train_kills: int = 3, n_images: int = 4, seed: int = 0, work: str | None = None,
        log=print, finish_training: bool = True) -> dict:
    """``finish_training``: after the training kills, run one more training to its end (else: only check that it
    is accepted, then stop it)."""
    rng = random.Random(seed)
    own = work is None
    work = work or tempfile.mkdtemp(prefix="ensam_faults_")
    rig = Rig(work, n_images)
    report = {"kills": {"label_save": 0, "weights_publish": 0, "training": 0}, "writes_before_kill": {},
              "problems": [], "restart_s": []}
    try:
        rig.start()
        for i in range(kills):
            mode = "label_save" if i % 2 == 0 else "weights_publish"
            stop = threading.Event()
            counts = report["writes_before_kill"]
            target = rig.label_writer if mode == "label_save" else rig.weights_writer
            threads = [threading.Thread(target=target, args=(stop, seed * 1000 + i * 10 + t, counts), daemon=True)
                       for t in range(2 if mode == "label_save" else 1)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 1.2 if mode == "label_save" else 2.5))
            rig.kill()
            stop.set()
            for t in threads:
                t.join(30)
            report["kills"][mode] += 1
            problems = rig.check_disk()
            try:
                report["restart_s"].append(round(rig.start(), 1))
            except RuntimeError as e:  # the server does not come back: the worst outcome, reported as such
                report["problems"] += [f"kill {i} ({mode}): {p}" for p in problems]
                report["problems"].append(f"kill {i} ({mode}): the server did not restart: {e}")
                log(f"kill {i + 1}/{kills} during {mode}: the server did not restart")
                rig.srv = None
                break
            problems += rig.check_served()
            for p in problems:
                report["problems"].append(f"kill {i} ({mode}): {p}")
            log(f"kill {i + 1}/{kills} during {mode}: {'OK' if not problems else problems}")
        for i in range(train_kills if rig.srv is not None else 0):
            r = requests.post(f"{rig.srv.url}/train/ensam", json={"device": "cpu", "max_seconds": 120,
                                                                 "labels": "blob_a", "val_split": 0.5}, timeout=60)
            if r.status_code != 200:
                report["problems"].append(f"training {i}: not started: {r.status_code} {r.text[:200]}")
                continue
            t0, pids = time.time(), []
            while time.time() - t0 < 120 and not pids:
                pids = _find_training(rig.srv.proc.pid)
                time.sleep(0.2)
            time.sleep(rng.uniform(2.0, 12.0 if finish_training else 6.0))  # start-up, data loading, steps
            pids = _find_training(rig.srv.proc.pid)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            report["kills"]["training"] += 1 if pids else 0
            if not pids:
                report["problems"].append(f"training {i}: no training process found to kill")
            t0 = time.time()
            status = None
            while time.time() - t0 < 60:
                s = requests.get(f"{rig.srv.url}/train/", timeout=30).json()
                status = s.get("status")
                if status not in ("RUNNING", "QUEUED", None):
                    break
                time.sleep(0.5)
            problems = rig.check_disk() + rig.check_served()
            problems += json_problems(os.path.join(rig.app_dir, "model", "train_stats.json"), "train_stats.json")
            if status in ("RUNNING", "QUEUED"):
                problems.append(f"the killed training still shows {status}")
            shown = (requests.get(f"{rig.srv.url}/info/", timeout=30).json().get("train_stats") or {}).get("ensam", {})
            if shown.get("status") == "RUNNING":
                problems.append("/info train_stats still says RUNNING for the killed training")
            for p in problems:
                report["problems"].append(f"training kill {i}: {p}")
            log(f"training kill {i + 1}/{train_kills} (status afterwards {status}): "
                f"{'OK' if not problems else problems}")
        # the next training after the kills is accepted and runs to its end
        if train_kills and rig.srv is not None:
            r = requests.post(f"{rig.srv.url}/train/ensam", json={"device": "cpu", "max_seconds": 20, "max_steps": 1,
                                                                 "val_every": 1, "labels": "blob_a",
                                                                 "val_split": 0.5}, timeout=60)
            report["train_after_kills"] = r.status_code
            if r.status_code != 200:
                report["problems"].append(f"a training after the kills was refused: {r.status_code} {r.text[:200]}")
            elif not finish_training:
                requests.delete(f"{rig.srv.url}/train/", timeout=30)
            else:
                t0 = time.time()
                while time.time() - t0 < 300:
                    s = requests.get(f"{rig.srv.url}/train/", timeout=30).json()
                    if s.get("status") in ("DONE", "ERROR", "STOPPED"):
                        break
                    time.sleep(1)
                report["train_after_kills_status"] = s.get("status")
                if s.get("status") != "DONE":
                    report["problems"].append(f"the training after the kills ended {s.get('status')}")
                problems = rig.check_disk()
                report["problems"] += [f"after the last training: {p}" for p in problems]
    finally:
        if rig.srv is not None:
            try:
                rig.kill()
            except (ProcessLookupError, OSError):
                pass
        if own:
            shutil.rmtree(work, ignore_errors=True)
    report["server_starts"] = rig.starts
    report["total_kills"] = sum(report["kills"].values())
    report["ok"] = not report["problems"]
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100, help="server kills (half during label saves, half during "
                                                             "weight publications)")
    ap.add_argument("--train-kills", type=int, default=3)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    rep = run(a.kills, a.train_kills, a.images, a.seed)
    text = json.dumps(rep, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
