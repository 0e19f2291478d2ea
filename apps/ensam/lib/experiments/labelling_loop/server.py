"""The monailabel server of one order (on a copy of the app) and the HTTP client the simulated annotator uses."""

from __future__ import annotations

import gzip
import json
import os
import time
from typing import Optional, Tuple

import numpy as np

from ...local_server import Service, free_port, launch, server_cmd, server_env, wait_ready
from ...local_server import copy_app  # noqa: F401 (the package exports it from here)


class LoopServer(Service):
    """A monailabel server process on an app copy and a studies folder (started like tests/conftest.py does);
    answering once constructed, stopped at the end of a ``with`` block."""

    def __init__(self, work: str, studies: str, family: str, threads: int = 1, start_timeout: float = 300.0):
        self.work = work
        self.app_dir = copy_app(os.path.join(work, "app"))
        self.studies = studies
        self.port = free_port()
        env = server_env(self.app_dir, threads, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false")
        cmd = server_cmd(self.app_dir, studies, self.port, "--conf", "labels", family, "--conf", "seg_floor", "0",
                         "--conf", "atlas_threads", str(threads))
        log_path = os.path.join(work, "server.log")
        super().__init__(f"http://127.0.0.1:{self.port}", launch(cmd, log_path, work, env), log_path)
        wait_ready(self, "/info/", start_timeout, "the server", every=1.0, request_timeout=10.0)

    @property
    def weights_dir(self) -> str:
        return os.path.join(self.app_dir, "model")


# ---------------------------------------------------------------------------------------------------- HTTP client
class Client:
    """The calls a 3D Slicer user's session makes, as plain HTTP (the same requests monailabel's client sends)."""

    def __init__(self, url: str, timeout: float = 600.0):
        import requests

        self.url = url
        self.timeout = timeout
        self.http = requests.Session()

    def _ok(self, r, what: str):
        if r.status_code != 200:
            raise RuntimeError(f"{what}: HTTP {r.status_code}: {r.text[:500]}")
        return r

    def info(self) -> dict:
        return self._ok(self.http.get(f"{self.url}/info/", timeout=self.timeout), "GET /info").json()

    def datastore(self) -> dict:
        return self._ok(self.http.get(f"{self.url}/datastore/", params={"output": "all"}, timeout=self.timeout),
                        "GET /datastore").json()

    def infer(self, model: str, image_id: str, params: dict) -> Tuple[Optional[np.ndarray], dict]:
        """(mask as stored in the answer's file, the answer's JSON); ``(None, {"status", "detail"})`` for a 4xx."""
        r = self.http.post(f"{self.url}/infer/{model}", params={"image": image_id, "output": "all"},
                           data={"params": json.dumps(params)}, timeout=self.timeout)
        if 400 <= r.status_code < 500:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text[:300]
            return None, {"status": r.status_code, "detail": detail}
        self._ok(r, f"POST /infer/{model} ({image_id})")
        from lib.io.infer_answer import split_answer

        meta, data = split_answer(r.content, r.headers.get("content-type", ""))
        if data is None:
            raise RuntimeError(f"POST /infer/{model} ({image_id}): no image in the answer")
        return _nifti_array(data), meta

    def save_label(self, image_id: str, mask_path: str, label_info: list) -> dict:
        with open(mask_path, "rb") as f:
            r = self.http.put(f"{self.url}/datastore/label", params={"image": image_id, "tag": "final"},
                              data={"params": json.dumps({"label_info": label_info, "client_id": "loop"})},
                              files={"label": (os.path.basename(mask_path), f)}, timeout=self.timeout)
        return self._ok(r, f"PUT /datastore/label ({image_id})").json()

    def next_sample(self, strategy: str, params: Optional[dict] = None) -> Optional[str]:
        r = self._ok(self.http.post(f"{self.url}/activelearning/{strategy}", json=params or {}, timeout=self.timeout),
                     f"POST /activelearning/{strategy}")
        body = r.json() or {}
        return body.get("id")

    def scoring(self, method: str, params: dict) -> dict:
        r = self.http.post(f"{self.url}/scoring/{method}", params={"run_sync": "true"}, json=params,
                           timeout=self.timeout)
        return self._ok(r, f"POST /scoring/{method}").json()

    def train(self, params: dict, poll_s: float = 2.0, timeout: float = 3600.0) -> dict:
        """Start the train task and wait for it; the task record as ``GET /train/`` gives it at the end."""
        r = self.http.post(f"{self.url}/train/ensam", json=params, timeout=self.timeout)
        self._ok(r, "POST /train/ensam")
        deadline = time.time() + timeout
        while time.time() < deadline:
            time.sleep(poll_s)
            t = self.http.get(f"{self.url}/train/", timeout=self.timeout)
            if t.status_code == 200 and (t.json() or {}).get("status") in ("DONE", "ERROR", "STOPPED"):
                return t.json()
        raise RuntimeError(f"the train task did not finish within {timeout:.0f} s")


def _nifti_array(data: bytes) -> np.ndarray:
    import nibabel as nib

    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return np.asarray(nib.Nifti1Image.from_bytes(data).dataobj)
