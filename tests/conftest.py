"""pytest configuration.

* The app's code is imported as ``lib.*`` from apps/ensam: that folder goes FIRST on ``sys.path``.
* ``ensam_server`` (session scope, used by tests/test_app_*.py): a real MONAI Label server started as a
  subprocess (``monailabel start_server ... --uvicorn_app lib.server:app``) on a free 127.0.0.1 port, over a
  throw-away copy of the app (so training never touches apps/ensam/model) and a datastore of small real NIfTI
  volumes; tracking, datastore auto-reload and auto-scoring off. Killed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_APP = os.path.join(ROOT, "apps", "ensam")
while _APP in sys.path:
    sys.path.remove(_APP)
sys.path.insert(0, _APP)

# Synthetic study geometry: not cubic, anisotropic, with an axis flip, so any axis mix-up shows.
SHAPE = (48, 40, 24)
SPACING = (1.5, 1.2, 3.0)
BLOBS = {  # name -> (centre [i, j, k], radii in voxels, intensity)
    "blob_a": ((14, 12, 8), (7, 6, 4), 900.0),
    "blob_b": ((34, 27, 15), (6, 7, 4), 500.0),
}


def synthetic_volume(seed: int, shift=(0, 0, 0)):
    """(image, label, affine): two ellipsoids with noise; label 1 = blob_a, 2 = blob_b."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    img = rng.normal(0.0, 40.0, SHAPE).astype(np.float32) - 100.0
    lab = np.zeros(SHAPE, dtype=np.uint8)
    for value, (c, r, inten) in enumerate(BLOBS.values(), start=1):
        c = [c[a] + shift[a] for a in range(3)]
        inside = ((ii - c[0]) / r[0]) ** 2 + ((jj - c[1]) / r[1]) ** 2 + ((kk - c[2]) / r[2]) ** 2 <= 1.0
        img[inside] += inten
        lab[inside] = value
    affine = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [30.0, -20.0, 10.0]
    return img, lab, affine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    """A process a fixture started (server, PACS): where it answers, its log, how to stop it."""

    url: str
    proc: subprocess.Popen = field(repr=False)
    log_path: str = ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def launch(cmd: list, log_path: str, cwd: str, env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, stdout + stderr into ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(svc: Service, path: str, timeout: float, what: str, every: float = 0.5) -> None:
    """Poll ``GET svc.url + path`` until 200; on exit or timeout stop the process and raise with its log tail."""
    import requests

    deadline = time.time() + timeout
    while True:
        if not svc.alive():
            raise RuntimeError(f"{what} exited with {svc.proc.returncode}:\n{svc.log_tail()}")
        try:
            if requests.get(f"{svc.url}{path}", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.time() > deadline:
            svc.stop()
            raise RuntimeError(f"{what} did not answer within {timeout:.0f} s:\n{svc.log_tail()}")
        time.sleep(every)


def server_env(app_dir: str, **extra: str) -> dict:
    """Environment of a test server: the app copy first on PYTHONPATH, tracking / sessions / auto-scoring off."""
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join([app_dir, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "MONAI_LABEL_TRACKING_ENABLED": "false",
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
        "MONAI_LABEL_SESSIONS": "false",
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
    })
    env.update(extra)
    return env


def server_cmd(app_dir: str, studies: str, port: int, *conf: str) -> list:
    """``monailabel start_server`` for the app copy, through ensam's uvicorn app (not the `monailabel` wrapper
    script: it runs whatever `python` is first on PATH)."""
    return [sys.executable, "-m", "monailabel.main", "start_server", "--app", app_dir, "--studies", studies,
            "--conf", "models", "ensam", *conf, "--host", "127.0.0.1", "--port", str(port),
            "--uvicorn_app", "lib.server:app"]


@dataclass
class EnsamServer(Service):
    app_dir: str = ""
    studies: str = ""
    work: str = ""
    images: dict = field(default_factory=dict)  # image id -> (image, label, affine) arrays


def _copy_app(dst: str) -> str:
    """apps/ensam without its model weights' mutable state: code + pre-trained weights (if any)."""
    ignore = shutil.ignore_patterns("__pycache__", "logs", "bin", "model", "*.pyc")
    shutil.copytree(_APP, dst, ignore=ignore)
    os.makedirs(os.path.join(dst, "model"), exist_ok=True)
    src_model = os.path.join(_APP, "model")
    if os.path.isdir(src_model):
        for f in os.listdir(src_model):  # shipped artefacts (weights, atlas_validation.json); not ensam.pt*, which
            if f.startswith("ensam"):       # the app's train task writes
                continue
            src, dst_f = os.path.join(src_model, f), os.path.join(dst, "model", f)
            if f.endswith(".pt"):
                os.symlink(src, dst_f)  # large and only read
            else:
                shutil.copyfile(src, dst_f)  # a test may rewrite its copy (never the repository's file)
    return dst


@pytest.fixture(scope="session")
def ensam_server(tmp_path_factory):
    import nibabel as nib

    work = str(tmp_path_factory.mktemp("ensam_server"))
    app_dir = _copy_app(os.path.join(work, "app"))
    studies = os.path.join(work, "studies")
    os.makedirs(studies)
    images = {}
    shifts = [(0, 0, 0), (3, -2, 1), (-2, 3, 2), (1, 1, -1), (0, 2, 1)]
    for n, shift in enumerate(shifts):
        seed = n + 1
        img, lab, aff = synthetic_volume(seed, shift)
        image_id = f"vol{n}"
        nib.save(nib.Nifti1Image(img, aff), os.path.join(studies, f"{image_id}.nii.gz"))
        images[image_id] = (img, lab, aff)

    # seg_floor 0: ensam_seg offers every name by its learned token here (the synthetic blobs); the floor and the
    # atlas routes are tested with their own server (tests/test_seg_by_example_server.py)
    yield from serve(work, app_dir, studies, images, "--conf", "labels", ",".join(BLOBS), "--conf", "seg_floor", "0")


def serve(work: str, app_dir: str, studies: str, images: dict, *conf: str):
    """Start the app copy over ``studies`` with ``--conf`` pairs ``conf``, yield it once it answers, stop it after
    (for a fixture: ``yield from serve(...)``)."""
    port = free_port()
    env = server_env(app_dir, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false")
    cmd = server_cmd(app_dir, studies, port, *conf)
    log_path = os.path.join(work, "server.log")
    server = EnsamServer(f"http://127.0.0.1:{port}", launch(cmd, log_path, work, env), log_path, app_dir, studies,
                         work, images)
    try:
        wait_ready(server, "/info/", 180, "server")
        yield server
    finally:
        server.stop()


def pytest_report_header(config):
    return f"ensam app: {_APP}"


# In CI (CI=true, set by .ci/run) every test runs or the run fails: a skip (a missing service, browser, sample data
# or package; pytest.skip, skipif, importorskip, a skipped module) is reported as a failure naming its reason. On a
# developer's machine skips stay allowed and are listed by `make test` (-rs).
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _fail_skip_in_ci(rep) -> None:
    if IN_CI and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[-1] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped in CI, where every test must run (CI=true): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The suite's last words: how many tests ran, and how many were skipped (0 in CI, or it failed)."""
    counts = {k: len(terminalreporter.stats.get(k, [])) for k in ("passed", "failed", "error", "skipped")}
    ran = counts["passed"] + counts["failed"]
    terminalreporter.write_line(f"ensam suite: {ran} tests ran ({counts['passed']} passed, {counts['failed']} failed, "
                                f"{counts['error']} errors), {counts['skipped']} skipped"
                                f"{' (CI: skips are failures)' if IN_CI else ''}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used a server / Orthanc fixture shows the tail of that process's log in its report; in
    CI a skip is a failure (see IN_CI)."""
    outcome = yield
    rep = outcome.get_result()
    _fail_skip_in_ci(rep)
    if rep.when == "call" and rep.failed:
        for name in item.fixturenames:
            svc = item.funcargs.get(name)
            if isinstance(svc, Service):
                rep.sections.append((f"{name} log ({svc.log_path}, last 80 lines)", svc.log_tail(80)))
