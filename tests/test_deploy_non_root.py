"""Issue 25: the documented deployment runs the server as an unprivileged user (deploy/ensam.service).

The server is started here the way the unit starts it: as a system user that owns only the datastore and the model
folder, with the code read-only to it. It must come up, answer, save a label and publish nothing outside what it
owns; a write into its own code (what an archive escape or a path bug would try) is refused by the system.
Needs root to switch user (CI runs as root): elsewhere the test is skipped, in CI (``CI=true``) it fails."""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import sys
import tempfile

import nibabel as nib
import pytest
import requests

from conftest import BLOBS, EnsamServer, _copy_app, free_port, server_cmd, server_env, synthetic_volume, wait_ready

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "deploy", "ensam.service")


def test_the_service_unit_runs_unprivileged():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(UNIT)
    svc = unit["Service"]
    assert svc.get("User") and svc["User"] != "root" and svc.get("Group") != "root"
    assert svc.get("NoNewPrivileges") == "yes" and svc.get("ProtectSystem") == "strict"
    assert svc.get("PrivateTmp") == "yes" and svc.get("CapabilityBoundingSet") == ""
    writable = svc.get("ReadWritePaths", "").split()
    assert writable and not any(p.rstrip("/").endswith(("/lib", "/ensam/apps/ensam", "/srv/ensam")) for p in writable)


def _uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))


@pytest.fixture(scope="module")
def unprivileged_server():
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI runs as root so that the unprivileged deployment can be tested; it is not root here")
        pytest.skip("switching to an unprivileged user needs root")
    import pwd

    user = pwd.getpwnam("nobody")
    work = tempfile.mkdtemp(prefix="ensam_deploy_")
    os.chmod(work, 0o755)
    app_dir = _copy_app(os.path.join(work, "app"))
    studies = os.path.join(work, "studies")
    os.makedirs(studies)
    images = {}
    for n in range(2):
        img, lab, aff = synthetic_volume(n + 1)
        nib.save(nib.Nifti1Image(img, aff), os.path.join(studies, f"vol{n}.nii.gz"))
        images[f"vol{n}"] = (img, lab, aff)
    for d, dirs, files in os.walk(work):  # everything readable, owned by root ...
        for name in dirs + files:
            p = os.path.join(d, name)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | stat.S_IRGRP | stat.S_IROTH | (stat.S_IXOTH if os.path.isdir(p)
                                                                                  else 0))
    for owned in (studies, os.path.join(app_dir, "model"), os.path.join(app_dir, "logs"), os.path.join(app_dir, "bin"),
                  os.path.join(work, "home")):
        os.makedirs(owned, exist_ok=True)  # ... but for what the unit lets the user write
        for d, dirs, files in os.walk(owned):
            for name in [d] + [os.path.join(d, x) for x in dirs + files]:
                os.chown(name, user.pw_uid, user.pw_gid)
    # the interpreter must be reachable by the service user (a system Python is; this machine's lies under /root,
    # 0700): folders on its path get "others may traverse" (not list) for the test, restored after
    restore = []
    needed = {os.path.dirname(os.path.realpath(sys.executable)), os.path.realpath(sys.prefix),
              os.path.join(ROOT, "apps", "ensam", "model")}  # the interpreter, the venv, the shipped weights
    for d in needed:
        while d and d != "/":
            mode = os.stat(d).st_mode
            if not mode & stat.S_IXOTH:
                restore.append((d, stat.S_IMODE(mode)))
                os.chmod(d, stat.S_IMODE(mode) | stat.S_IXOTH)
            d = os.path.dirname(d)
    port = free_port()
    env = server_env(app_dir, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", HOME=os.path.join(work, "home"))
    log_path = os.path.join(work, "server.log")
    cmd = server_cmd(app_dir, studies, port, "--conf", "labels", ",".join(BLOBS))
    with open(log_path, "w"):
        pass
    os.chown(log_path, user.pw_uid, user.pw_gid)
    import subprocess

    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, cwd=os.path.join(work, "home"), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    server = EnsamServer(f"http://127.0.0.1:{port}", proc, log_path, app_dir, studies, work, images)
    try:
        wait_ready(server, "/info/", 240, "unprivileged server")
        yield server
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        for d, mode in restore:
            os.chmod(d, mode)


def test_the_server_works_as_an_unprivileged_user(unprivileged_server, tmp_path):
    s = unprivileged_server
    assert _uid_of(s.proc.pid) != 0
    _, lab, aff = s.images["vol0"]
    nib.save(nib.Nifti1Image(lab, aff), str(tmp_path / "l.nii.gz"))
    r = requests.put(f"{s.url}/datastore/label", params={"image": "vol0", "tag": "final"}, timeout=60,
                     files={"label": ("l.nii.gz", (tmp_path / "l.nii.gz").read_bytes())})
    assert r.status_code == 200, r.text
    r = requests.post(f"{s.url}/infer/ensam", params={"image": "vol0", "output": "json"}, timeout=120,
                      data={"params": '{"foreground": [[14, 12, 8]]}'})
    assert r.status_code == 200, r.text
    # the code is not the server's to change: what an escape from its folders would try fails at the system
    import subprocess

    target = os.path.join(s.app_dir, "lib", "ensam_written_by_server.py")
    probe = subprocess.run(["python3", "-c", f"open({target!r}, 'w').write('x')"], user=_uid_of(s.proc.pid),
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr and not os.path.exists(target)
