"""First click after start-up (issue 30): N fresh server starts, each sent a click the moment ``/info`` answers.

Each run starts a new server process (``monailabel start_server`` as ``make serve`` does: start-up scoring of every
image on, ``--conf`` as given) on one datastore of at least 12 real volumes (copies of the sample CT, MR and MNI
scans, or ``--studies``), polls ``GET /info/`` every 50 ms, sends the first click the moment it answers, then a second
click on the same image (a refinement, with the session of the first) and a first click on another image (a volume
not read yet), and stops the server. Printed: per run the client's wall time and the server's split of the first
click (``latencies``: load = reading the volume, prompt = engine lookup (its build when not preloaded), wait, infer =
encode + decode + paste + graph cut, write), the start-up (process start -> ``/info``) and the server's warm-up line;
then p50 / p95 over the runs, with the load average before and after. A figure, not a test: nothing is asserted.

    PYTHONPATH=apps/ensam .venv/bin/python scripts/bench_first_click.py --runs 5
    PYTHONPATH=apps/ensam .venv/bin/python scripts/bench_first_click.py --runs 5 --conf preload false
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "apps", "ensam")
sys.path.insert(0, APP)
from lib.local_server import copy_app, free_port, server_env, start_server, wait_ready  # noqa: E402 (this checkout's)
SAMPLE = os.path.join(ROOT, "sample-datasets")
# (file, a foreground click inside the body, a second click near it): the first two are the clicked images
SOURCES = [("studies/ct_dicom.nii.gz", [256, 200, 10], [250, 210, 10]),
           ("studies/ct_small.nii.gz", [60, 50, 15], [62, 52, 15]),
           ("studies/mr.nii.gz", [58, 45, 10], [60, 47, 10]),
           ("train/imagesTr/mni152_t1.nii.gz", [98, 116, 94], [100, 118, 94])]


def _load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def make_studies(dst: str, count: int) -> list:
    """``count`` copies of the sample volumes under ids s00.. (round robin); returns [(id, click, click2)]."""
    os.makedirs(dst)
    made = []
    for n in range(count):
        rel, p1, p2 = SOURCES[n % len(SOURCES)]
        src = os.path.join(SAMPLE, rel)
        if not os.path.exists(src):
            raise SystemExit(f"sample data missing: {src} (make data)")
        name = f"s{n:02d}_{os.path.basename(rel).split('.')[0]}"
        shutil.copyfile(src, os.path.join(dst, name + ".nii.gz"))
        made.append((name, p1, p2))
    return made


def _click(url: str, image: str, params: dict, timeout: float = 600) -> tuple:
    t0 = time.perf_counter()
    r = requests.post(f"{url}/infer/ensam", params={"image": image, "output": "json"},
                      data={"params": json.dumps(params)}, timeout=timeout)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"click on {image}: {r.status_code} {r.text[:300]}")
    return seconds, r.json().get("latencies", {})


def one_run(work: str, app_dir: str, studies: str, images: list, conf: list, threads: int, env_extra: dict,
            timeout: float) -> dict:
    port = free_port()
    log = os.path.join(work, f"server-{port}.log")
    # as `make serve`: start-up scoring and sessions on (not quiet)
    env = server_env(app_dir, threads, quiet=False, **env_extra)
    t_spawn = time.perf_counter()
    server = start_server(app_dir, studies, *conf, log_path=log, cwd=work, env=env, port=port)
    try:
        wait_ready(server, "/info/", timeout, "server", every=0.05)
        t_info = time.perf_counter() - t_spawn
        url = server.url
        (first, p1, p2), (other, q1, _) = images[0], images[1]
        s1, lat1 = _click(url, first, {"foreground": [p1], "client_id": "bench", "label": "a"})
        s2, lat2 = _click(url, first, {"foreground": [p1, p2], "client_id": "bench", "label": "a"})
        s3, lat3 = _click(url, other, {"foreground": [q1], "client_id": "bench", "label": "b"})
    finally:
        server.stop(grace=30)
    with open(log, errors="replace") as f:
        text = f.read()
    warm = re.findall(r"ensam warm-up[^\n]*", text)
    return {"start_to_info_s": round(t_info, 2), "first_click_s": round(s1, 3), "first_latencies": lat1,
            "refine_click_s": round(s2, 3), "refine_latencies": lat2, "other_image_first_click_s": round(s3, 3),
            "other_latencies": lat3, "warm_up": warm[-1] if warm else None}


def _pct(values, q):
    return round(float(np.percentile(np.asarray(values, float), q)), 3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="fresh server starts")
    ap.add_argument("--volumes", type=int, default=12, help="volumes in the datastore (copies of the samples)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="a --conf of the server (repeatable), e.g. --conf preload false")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="server environment")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for /info")
    ap.add_argument("--out", help="write every run's figures here (JSON)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (server logs)")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="ensam_first_click_")
    conf = [x for kv in a.conf for x in ("--conf", *kv)]
    env_extra = dict(e.split("=", 1) for e in a.env)
    runs = []
    try:
        app_dir = copy_app(os.path.join(work, "app"))
        images = make_studies(os.path.join(work, "studies"), max(a.volumes, 2))
        print(f"{a.runs} fresh starts, {len(images)} volumes, {a.threads} threads, conf {a.conf or 'defaults'}; "
              f"{_load()}", flush=True)
        for n in range(a.runs):
            r = one_run(work, app_dir, os.path.join(work, "studies"), images, conf, a.threads, env_extra, a.timeout)
            r["load_after"] = list(np.round(os.getloadavg(), 2))
            runs.append(r)
            lat = r["first_latencies"]
            split = " ".join(f"{k}={lat.get(k, 0):.2f}" for k in ("load", "prompt", "wait", "encode", "decode",
                                                                     "paste", "cut", "write", "total"))
            print(f"run {n + 1}: /info after {r['start_to_info_s']:.1f} s; first click {r['first_click_s']:.3f} s "
                  f"(server: {split}); refinement {r['refine_click_s']:.3f} s; first click on another image "
                  f"{r['other_image_first_click_s']:.3f} s; {_load()}", flush=True)
            if r["warm_up"]:
                print(f"       {r['warm_up']}", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")
    if not runs:
        return 1
    summary = {k: {"p50": _pct([r[k] for r in runs], 50), "p95": _pct([r[k] for r in runs], 95),
                   "max": round(max(r[k] for r in runs), 3)}
               for k in ("first_click_s", "refine_click_s", "other_image_first_click_s", "start_to_info_s")}
    summary["first_click_server_p50"] = {k: _pct([r["first_latencies"].get(k, 0.0) for r in runs], 50)
                                         for k in ("load", "prompt", "wait", "encode", "decode", "paste", "cut",
                                                   "write", "total")}
    print(f"first click after /info: p50 {summary['first_click_s']['p50']:.3f} s, p95 "
          f"{summary['first_click_s']['p95']:.3f} s, max {summary['first_click_s']['max']:.3f} s over {len(runs)} "
          f"starts (refinement p50 {summary['refine_click_s']['p50']:.3f} s; another image's first click p50 "
          f"{summary['other_image_first_click_s']['p50']:.3f} s; start -> /info p50 "
          f"{summary['start_to_info_s']['p50']:.1f} s); {_load()}")
    print("server split of the first click, p50: " + json.dumps(summary["first_click_server_p50"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"runs": runs, "summary": summary, "threads": a.threads, "conf": a.conf,
                       "volumes": len(images), "cpu_count": os.cpu_count()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
