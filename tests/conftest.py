"""pytest configuration.

* The app's code is imported as ``lib.*`` from apps/ensam: that folder goes FIRST on ``sys.path``.
* ``ensam_server`` (session scope, used by tests/test_app_*.py): a real MONAI Label server started as a
  subprocess (``monailabel start_server ... --uvicorn_app lib.server:app``) on a free 127.0.0.1 port, over a
  throw-away copy of the app (so training never touches apps/ensam/model) and a datastore of small real NIfTI
  volumes; tracking, datastore auto-reload and auto-scoring off. Killed at the end of the session.
* The process helpers (``free_port``, ``Service``, ``launch``, ``wait_ready``, ``server_env``, ``server_cmd``) are
  lib/local_server.py's, importable from here as before.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_APP = os.path.join(ROOT, "apps", "ensam")
while _APP in sys.path:
    sys.path.remove(_APP)
sys.path.insert(0, _APP)

# the server process helpers, here for the tests that import them from conftest
from lib.local_server import (Service, copy_app, free_port, launch, server_cmd, server_env,  # noqa: E402,F401
                              start_server, wait_ready)

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


@dataclass
class EnsamServer(Service):
    app_dir: str = ""
    studies: str = ""
    work: str = ""
    images: dict = field(default_factory=dict)  # image id -> (image, label, affine) arrays


def _copy_app(dst: str) -> str:
    """apps/ensam as a test server runs it (lib.local_server.copy_app): code + shipped model files, no ensam*."""
    return copy_app(dst, _APP)


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
    server = start_server(app_dir, studies, *conf, log_path=os.path.join(work, "server.log"), cwd=work,
                          env=server_env(app_dir, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false"), cls=EnsamServer,
                          fields=dict(app_dir=app_dir, studies=studies, work=work, images=images))
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
