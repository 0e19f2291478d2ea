"""A throw-away ensam server for the tests that attack it (hostile input, fuzzing, load, faults, auth).

Unlike conftest's session-wide ``ensam_server`` (whose datastore other tests count), each of these gets its own
app copy, datastore and port, so whatever a test does to it stays there. The pre-trained weights are COPIED into the
app copy (conftest links them): a route that writes the weights file must never reach the shipped one.
"""

from __future__ import annotations

import os
import shutil

import nibabel as nib

from conftest import BLOBS, EnsamServer, _copy_app, free_port, launch, server_cmd, server_env, synthetic_volume, \
    wait_ready


def snapshot_files(root: str) -> dict:
    """path -> (size, mtime_ns) of every file under ``root`` (the datastore's files and index)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def start_hostile_server(work: str, n_images: int = 3, env_extra: dict | None = None, conf: tuple = (),
                         timeout: float = 240, ready_path: str = "/info/") -> EnsamServer:
    app_dir = _copy_app(os.path.join(work, "app"))
    model = os.path.join(app_dir, "model")
    for f in os.listdir(model):
        p = os.path.join(model, f)
        if os.path.islink(p):
            target = os.path.realpath(p)
            os.remove(p)
            shutil.copy2(target, p)
    studies = os.path.join(work, "studies")
    os.makedirs(studies, exist_ok=True)
    images = {}
    for n in range(n_images):
        img, lab, aff = synthetic_volume(n + 1, (n % 3 - 1, (n * 2) % 3 - 1, 0))
        nib.save(nib.Nifti1Image(img, aff), os.path.join(studies, f"vol{n}.nii.gz"))
        images[f"vol{n}"] = (img, lab, aff)
    env = server_env(app_dir, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", **(env_extra or {}))
    port = free_port()
    cmd = server_cmd(app_dir, studies, port, "--conf", "labels", ",".join(BLOBS), *conf)
    log_path = os.path.join(work, "server.log")
    server = EnsamServer(f"http://127.0.0.1:{port}", launch(cmd, log_path, work, env), log_path, app_dir, studies,
                         work, images)
    wait_ready(server, ready_path, timeout, "server")
    return server
