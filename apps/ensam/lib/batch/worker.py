"""The worker of a batch job: :class:`Segmenter`, a callable class that builds the engine ONCE and then segments one
study per call. The local backend calls it in-process; the Ray backend hands the class to Ray Data
(``map_batches``), which builds one per actor (CPU or GPU) and calls it with batches of one study.

Per study: (result already there? -> nothing to do) -> the volume (a file, a DICOM folder, or a DICOMweb series
fetched into a temporary folder) -> the engine (``segment`` per manifest object, or ``segment_labels`` for the
prompt-free names) -> the label map published atomically with its record -> for a DICOMweb study, the label map as
DICOM SEG stored back (UIDs derived from the result key: storing it again replaces the same instance). Any error
is the study's failure, recorded with its reason; the worker goes on with the next study.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from typing import Dict, Optional, Tuple

import numpy as np

from lib.batch.store import ResultStore, Task

logger = logging.getLogger(__name__)


class Segmenter:
    """``Segmenter(conf)`` (conf: :meth:`lib.batch.job.BatchJob.worker_conf`): ``run(task) -> record`` for one
    study; ``__call__(batch)`` is the Ray Data form (a batch ``{"task": [json, ...]}`` -> ``{"record": [json,
    ...]}``)."""

    def __init__(self, conf: dict):
        self.conf = dict(conf)
        self.store = ResultStore(conf["out"])
        self.node = socket.gethostname()
        self.ray_node = _ray_node_id()
        self.engine = None
        self.engine_error = ""
        try:
            self.engine = self._build_engine()
        except Exception as e:  # noqa: BLE001 - every study then fails with this reason (nothing is written)
            self.engine_error = f"the engine could not be built: {type(e).__name__}: {e}"
            logger.error(f"ensam batch worker: {self.engine_error}")

    # ---- the engine, once per worker ---------------------------------------------------------------------
    def _build_engine(self):
        import torch

        from lib.engine import EnsamEngine

        if self.conf.get("threads"):
            torch.set_num_threads(int(self.conf["threads"]))
        device = _device(self.conf.get("device"))
        path = self.conf.get("weights")
        kwargs = dict(network_config=self.conf.get("network_config"), **(self.conf.get("engine_kwargs") or {}))
        if not path:
            return EnsamEngine(weights=None, device=device, **kwargs)
        # the bytes read once, checked against the job's version, loaded from a private copy: a publication of new
        # weights during the job cannot pair this job's key with other weights
        with open(path, "rb") as f:
            data = f.read()
        sha = hashlib.sha256(data).hexdigest()
        if sha != self.conf["weights_sha256"]:
            raise RuntimeError(f"the weights {path} changed since the job started (sha256 {sha[:12]}, the job's "
                               f"{self.conf['weights_sha256'][:12]}): run the job again")
        tmp = tempfile.mkdtemp(prefix="ensam-batch-weights-")
        try:
            copy = os.path.join(tmp, os.path.basename(path))
            with open(copy, "wb") as f:
                f.write(data)
            stem = path[:-3] if path.endswith(".pt") else path
            for side in (stem + ".json", stem + "_labels.json"):  # the legacy layout's meta beside the weights
                if os.path.exists(side):
                    shutil.copyfile(side, os.path.join(tmp, os.path.basename(side)))
            return EnsamEngine(weights=copy, device=device, **kwargs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- Ray Data's form ---------------------------------------------------------------------------------
    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        records = [json.dumps(self.run(Task.from_json(str(t))), default=str) for t in batch["task"]]
        return {"record": np.asarray(records, dtype=object)}

    # ---- one study ---------------------------------------------------------------------------------------
    def run(self, task: Task) -> dict:
        sid, key = task.study["id"], task.key
        done = self.store.done(sid, key)
        if done is not None:  # an earlier attempt (a task retried after its node died) finished it
            return dict(done, status="ok", skipped=True)
        t0 = time.time()
        base = {"request": task.request, "weights_sha256": self.conf["weights_sha256"],
                "weights": os.path.basename(self.conf.get("weights") or ""), "node": self.node,
                "ray_node": self.ray_node, "pid": os.getpid()}
        tmp = tempfile.mkdtemp(prefix="ensam-batch-")
        try:
            if self.engine is None:
                raise RuntimeError(self.engine_error)
            vol, series_dir = _load(task.study, tmp)
            t_load = time.time()
            label, names, voxels = self._segment(vol, task)
            t_seg = time.time()
            from lib.io.imageio import write_mask

            ext = self.conf.get("extension") or ".nii.gz"
            out = write_mask(label, vol, extension=ext, dtype="uint16" if label.dtype == np.uint16 else "uint8",
                             directory=tmp)
            seg = None
            if series_dir and self.conf.get("dicom_seg", True) and task.study.get("dicomweb"):
                seg = _store_dicom_seg(task.study["dicomweb"], series_dir, out, names, key)
            record = dict(base, status="ok", label_names=names, voxels=voxels, dicom_seg=seg,
                          shape=list(vol.shape), source=task.study.get("path") or task.study.get("dicomweb"),
                          seconds={"load": round(t_load - t0, 3), "segment": round(t_seg - t_load, 3),
                                   "total": round(time.time() - t0, 3)},
                          finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            return self.store.publish(sid, key, out, ext, record)
        except Exception as e:  # noqa: BLE001 - one study's failure must not stop the others
            reason = f"{type(e).__name__}: {e}"
            logger.warning(f"ensam batch: {sid} failed: {reason}")
            rec = dict(base, status="failed", reason=reason, seconds={"total": round(time.time() - t0, 3)},
                       traceback=traceback.format_exc(limit=4)[-2000:])
            return self.store.record_failure(sid, key, rec)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _segment(self, vol, task: Task) -> Tuple[np.ndarray, Dict[str, int], Dict[str, int]]:
        """(label map, {name: value}, {name: voxels}): objects 1..N in manifest order (a later object wins where
        they overlap), or each name at its token id + 1 (a later name wins)."""
        req = task.request
        if req["kind"] == "prompts":
            from lib.geometry import check_prompts
            from lib.session import SessionRegistry

            out = np.zeros(vol.shape, dtype=np.uint8)
            names: Dict[str, int] = {}
            vol = dataclasses.replace(vol, key=f"batch:{task.key}")  # the study's encodings, whatever its path
            for n, obj in enumerate(req["objects"]):  # each object: a one-step session of its own
                pts = obj.get("points") or None
                prompts = check_prompts(pts, obj.get("point_labels") if pts else None, obj.get("boxes") or None,
                                        vol.shape)
                mask, _ = SessionRegistry.transient().add_prompts(self.engine, vol, prompts)
                out[mask > 0] = n + 1
                names[str(obj.get("label") or f"object_{n + 1}")] = n + 1
        else:
            ids = {name: int(i) for name, i in req["names"].items()}
            masks = self.engine.segment_labels(vol.array, vol.affine, list(ids.values()))
            out = np.zeros(vol.shape, dtype=np.uint8 if max(ids.values()) < 255 else np.uint16)
            names = {}
            for name, i in ids.items():
                out[np.asarray(masks[i]) > 0] = i + 1
                names[name] = i + 1
        voxels = {name: int(np.count_nonzero(out == v)) for name, v in names.items()}
        return out, names, voxels


def _ray_node_id() -> str:
    """The Ray node this worker runs on ("" outside Ray): which node wrote a result, in its record."""
    if "ray" not in sys.modules:
        return ""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _device(name: Optional[str]) -> str:
    """"auto": the GPU Ray gave this worker (or the first one), else the CPU."""
    import torch

    name = (name or "auto").strip().lower()
    if name in ("auto", ""):
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but this worker sees no GPU")
    return name


def _load(study: dict, tmp: str):
    """(volume, DICOM series folder or ""): THE volume loader on a file / folder, or on a DICOMweb series fetched
    into ``tmp``."""
    from lib.io.volumes import load_volume

    if study.get("dicomweb"):
        series_dir = os.path.join(tmp, "series")
        _fetch_series(study["dicomweb"], series_dir)
        return load_volume(series_dir), series_dir
    path = study.get("path") or ""
    if not path:
        raise FileNotFoundError(f"no image {study.get('id')!r} in the job's input")
    return load_volume(path), (path if os.path.isdir(path) else "")


def dicomweb_client(ref: dict):
    """A DICOMweb client for ``ref`` ({"url", optional prefixes}): monailabel's (its multipart quirk handled), the
    user / password of ``MONAI_LABEL_DICOMWEB_USERNAME`` / ``_PASSWORD`` on this worker when set, series retrieved
    as stored (:func:`lib.monailabel_patches.retrieve_series_as_stored`)."""
    from monailabel.datastore.dicom import DICOMwebClientX

    from lib.monailabel_patches import retrieve_series_as_stored

    session = None
    user, password = os.environ.get("MONAI_LABEL_DICOMWEB_USERNAME"), os.environ.get("MONAI_LABEL_DICOMWEB_PASSWORD")
    if user and password:
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(user, password)
    client = DICOMwebClientX(url=ref["url"], session=session, qido_url_prefix=ref.get("qido_prefix") or None,
                             wado_url_prefix=ref.get("wado_prefix") or None,
                             stow_url_prefix=ref.get("stow_prefix") or None)
    retrieve_series_as_stored(client)
    return client


def _fetch_series(ref: dict, folder: str) -> None:
    from monailabel.datastore.utils.dicom import dicom_web_download_series

    dicom_web_download_series(ref.get("study") or None, ref["series"], folder, dicomweb_client(ref))
    if not os.listdir(folder):
        raise FileNotFoundError(f"DICOMweb series {ref['series']} has no instances at {ref['url']}")


def uid_from(key: str, what: str) -> str:
    """A DICOM UID derived from a result key (2.25 + a 128-bit integer): the same result gets the same UIDs."""
    return "2.25." + str(int(hashlib.sha256(f"{key}:{what}".encode()).hexdigest()[:32], 16))


def _store_dicom_seg(ref: dict, series_dir: str, label_file: str, names: Dict[str, int], key: str) -> Optional[dict]:
    """The label map as DICOM SEG (:func:`lib.dicom_seg.write_dicom_seg`) with UIDs from ``key``, stored
    with STOW-RS. None when the label map is empty (nothing to store)."""
    import pydicom
    from monailabel.datastore.utils.dicom import dicom_web_upload_dcm

    from lib.dicom_seg import write_dicom_seg

    seg_file = write_dicom_seg(series_dir, label_file, label_names=names, series_description="ensam batch")
    if not seg_file:
        return None
    try:
        ds = pydicom.dcmread(seg_file)
        ds.SeriesInstanceUID = uid_from(key, "series")
        ds.SOPInstanceUID = uid_from(key, "instance")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(seg_file)
        stored = dicom_web_upload_dcm(seg_file, dicomweb_client(ref))
        return {"series": str(ds.SeriesInstanceUID), "sop_instance": str(ds.SOPInstanceUID),
                "stored_series": stored, "study": str(ds.StudyInstanceUID)}
    finally:
        os.remove(seg_file)
