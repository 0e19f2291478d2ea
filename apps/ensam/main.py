"""MONAI Label app for ENSAM, a small promptable 3D segmentation model.

Start: ``make serve`` (or ``monailabel start_server --app apps/ensam --studies <folder or DICOMweb URL>
--conf models ensam --uvicorn_app lib.server:app`` with apps/ensam on PYTHONPATH).

Tasks: infer ``ensam`` (interactive, deepgrow type: clicks, ROI/boxes, previous result, undo), ``ensam_seg``
(prompt-free segmentation of the known label names) and ``ensam_scribbles`` (3D Slicer's Scribbles: strokes as
prompts, with the previous result of ``ensam``'s session); train ``ensam``; scoring ``novelty`` and ``uncertainty``;
strategies ``first``, ``random``, ``novelty``, ``uncertainty``; batch inference with an optional prompt manifest.
"""

import logging
import os
import pathlib
import shutil
import sys
import threading
import time
from typing import Any, Dict

# first: in a background task process (scoring, batch inference, training) importing it lowers the CPU priority
# before the imports below (18 s at start-up on 2 busy cores, during which a first click waited)
from lib.background import in_background_task, yield_to_interactive
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First

_APP_DIR = os.path.dirname(os.path.realpath(__file__))
if _APP_DIR not in sys.path:  # lib.* is imported lazily later (engine, training): keep the app folder importable
    sys.path.insert(0, _APP_DIR)

from lib import monailabel_patches  # noqa: E402  (every patch of monailabel internals: see its docstring)
from lib.activelearning.interactive_gate import GATE_ENV, gate, server_gate_path  # noqa: E402
from lib.configs.ensam import EnsamConfig  # noqa: E402
from lib.infers.batch import EnsamBatchInfer  # noqa: E402
from lib.dicom_seg import write_dicom_seg  # noqa: E402
from lib.settings import env_value  # noqa: E402

logger = logging.getLogger(__name__)

CONFIGS = {"ensam": EnsamConfig}
DCMQI_TOOL = "itkimage2segimage"  # monailabel looks for it on PATH, which includes <app>/bin


class DICOMwebDatastoreWithPydicomSeg(DICOMWebDatastore):
    """monailabel's DICOMweb datastore whose final labels become DICOM SEG without dcmqi when it is missing (the
    created datastore's class is swapped to this one by ``lib.monailabel_patches.AppPatches``).

    monailabel 0.8.5 converts a saved ``final`` label to DICOM SEG with dcmqi's ``itkimage2segimage`` only (it has
    no setting to choose its pydicom-seg writer); offline, dcmqi cannot be downloaded and every ``PUT
    /datastore/label`` failed with a bare 500 and nothing saved. Here, when the tool is not on PATH, the same steps
    run with ``lib.dicom_seg.write_dicom_seg`` (pydicom-seg, segments named by their label value): SEG ->
    STOW to the DICOMweb server -> the label kept in the local cache with the SEG's SeriesInstanceUID; the cached
    list of labelled series is dropped so that ``/datastore`` counts the new label at once. An empty label or a
    failed conversion/upload answers a 4xx/502 JSON error instead of a 500. With dcmqi present, monailabel's own
    code runs unchanged."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        if label_tag != DefaultLabelTag.FINAL or shutil.which(DCMQI_TOOL):
            return super().save_label(image_id, label_filename, label_tag, label_info, label_id)

        image_uri = self.get_image_uri(image_id)  # fetches the series into the cache if needed
        converted = ""
        if "".join(pathlib.Path(label_filename).suffixes) == ".bin":  # raw voxels, as OHIF's client sends them
            converted = label_filename = binary_to_image(image_uri, label_filename)
        try:
            series_dir = monailabel_patches.dicomweb_series_folder(self, image_id)
            try:
                seg_file = write_dicom_seg(series_dir, label_filename, label_info.get("label_info"))
            except Exception as e:  # noqa: BLE001 - e.g. a label not on the series' grid
                raise HTTPException(status_code=400, detail=f"the label cannot be written as DICOM SEG for "
                                                            f"{image_id}: {type(e).__name__}: {e}") from e
            if not seg_file:
                raise HTTPException(status_code=400, detail="the label is empty: nothing to store as DICOM SEG")
            try:
                seg_series = dicom_web_upload_dcm(seg_file, monailabel_patches.dicomweb_client_of(self))
            except Exception as e:  # noqa: BLE001 - the PACS refused it or is unreachable
                raise HTTPException(status_code=502, detail=f"the DICOMweb server did not store the DICOM SEG: "
                                                            f"{type(e).__name__}: {e}") from e
            finally:
                os.unlink(seg_file)
            image_info = self.get_image_info(image_id)
            label_info.update({"SeriesInstanceUID": seg_series, "Modality": image_info.get("Modality"),
                               "PatientID": image_info.get("PatientID"),
                               "StudyInstanceUID": image_info.get("StudyInstanceUID")})
            logger.info(f"label of {image_id} stored as DICOM SEG series {seg_series} (pydicom-seg)")
            # monailabel caches the list of labelled series for 2 h (MONAI_LABEL_DICOMWEB_CACHE_EXPIRY): without
            # this, /datastore and the next-sample strategies would not see the new label
            getattr(DICOMWebDatastore.get_labeled_images, "cache_clear", lambda: None)()
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        finally:
            if converted:
                os.unlink(converted)


class EnsamApp(monailabel_patches.AppPatches, MONAILabelApp):
    """The ensam app; the private ``MONAILabelApp`` methods it overrides (the DICOMweb datastore's class, the
    optional dcmqi download) are in :class:`lib.monailabel_patches.AppPatches`."""

    dicomweb_datastore_class = DICOMwebDatastoreWithPydicomSeg  # a DICOMweb datastore becomes one (patch 6)

    def __init__(self, app_dir, studies, conf):
        yield_to_interactive()  # scoring / batch inference / training processes: interactive requests first
        if not in_background_task():  # the server: its task processes inherit the gate their work pauses at
            os.environ[GATE_ENV] = server_gate_path()
        monailabel_patches.check_version()
        conf = dict(conf or {})
        self.model_dir = os.path.join(app_dir, "model")
        names = [n.strip() for n in conf.get("models", "ensam").split(",") if n.strip()]
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            raise ValueError(f"unknown model config(s) {unknown}; available: {sorted(CONFIGS)}")
        self.models: Dict[str, TaskConfig] = {}
        for name in names:
            c = CONFIGS[name]()
            c.init(name, self.model_dir, conf, None)
            self.models[name] = c
        logger.info(f"+++ ensam models: {list(self.models)}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="ensam",
            description="ENSAM: small, fast, promptable 3D segmentation (clicks, boxes, label names)",
            version="0.1.0",
        )
        # ensam_seg uses the datastore's final labels as atlases (issue 12)
        for task in monailabel_patches.app_tasks(self, "infer").values():
            if hasattr(task, "datastore_atlases"):
                task.datastore = self.datastore

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        for c in self.models.values():
            t = c.infer()
            infers.update(t if isinstance(t, dict) else {c.name: t})
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers: Dict[str, TrainTask] = {}
        for name, c in self.models.items():
            t = c.trainer()
            if t:
                trainers[name] = t
        return trainers

    def init_strategies(self) -> Dict[str, Strategy]:
        strategies: Dict[str, Strategy] = {"first": First()}  # random, novelty, uncertainty: the config's
        for c in self.models.values():
            s = c.strategy()
            if s:
                strategies.update(s if isinstance(s, dict) else {c.name: s})
        return strategies

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        methods: Dict[str, ScoringMethod] = {}
        for c in self.models.values():
            s = c.scoring_method()
            if s:
                methods.update(s if isinstance(s, dict) else {c.name: s})
        return methods

    def init_batch_infer(self):
        return EnsamBatchInfer(monailabel_patches.app_tasks(self, "infer"))

    def init_datastore(self):
        """A local studies folder gets ``lib.monailabel_patches.atomic_datastore.AtomicLocalDatastore`` (labels,
        images and the index written atomically: a crash never leaves a truncated label or index); DICOMweb etc. as
        monailabel does."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return monailabel_patches.local_datastore(self.studies)

    def datastore(self):
        """The datastore, re-read first if another process (batch inference, scoring, training run as
        subprocesses) rewrote a local datastore's file: cheap (one stat) and keeps this process from writing
        back a stale copy when datastore auto-reload is off."""
        datastore = monailabel_patches.app_datastore(self)
        monailabel_patches.reload_local_datastore(datastore)
        return datastore

    def infer(self, request, datastore=None):
        """monailabel's inference with the image id always resolved through the datastore: monailabel reads a file
        of the server's working directory first when one has the id's name (an image stored as ``Makefile`` was a
        500); see ``lib.monailabel_patches.infer_by_datastore_id``.

        Every inference of the server holds the interactive gate: background work (start-up scoring, scoring runs)
        pauses while it is in flight (:mod:`lib.activelearning.interactive_gate`). In a task process (batch
        inference) an inference is background work itself: it pauses for the server's."""
        role = gate().background(f"inference {request.get('model') if isinstance(request, dict) else ''}") \
            if in_background_task() else gate().interactive()
        with role:
            return monailabel_patches.infer_by_datastore_id(self._infer_resolved, request,
                                                            datastore if datastore is not None else self.datastore())

    def _infer_resolved(self, request, datastore):
        self._check_session_step(request)
        return super().infer(request, datastore)

    def _check_session_step(self, request: dict) -> None:
        """A request that continues a session (``session_step``: the ``session.step`` of the answer it builds on)
        on a server that does not hold that session is a 409 saying so, never a mask computed without the previous
        result: the session was evicted, expired, or lived on a replica that died (sessions are in memory, per
        server; docs/SCALE_OUT.md). ``reset_state`` starts again and is never refused."""
        from lib.errors import RequestError
        from lib.request_parsing import first_value, parse_bool

        if not isinstance(request, dict) or request.get("session_step") in (None, ""):
            return
        task = monailabel_patches.app_tasks(self, "infer").get(request.get("model"))
        sessions = getattr(task, "sessions", None)
        if sessions is None:
            return
        raw = first_value(request.get("session_step"))
        try:
            step = int(raw)
            if isinstance(raw, bool) or step < 0 or step != float(raw):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise RequestError(f"session_step must be a whole number >= 0 (the session.step of the previous "
                               f"answer), got {str(raw)[:40]!r}") from None
        if step == 0 or parse_bool(request.get("reset_state"), "reset_state"):
            return
        from lib.infers.ensam_infer import request_session_key

        client_id, label = first_value(request.get("client_id")) or "", first_value(request.get("label")) or ""
        image = request.get("image")
        if not isinstance(image, str) or not (client_id or label):
            return
        if sessions.depth(request_session_key(request, image, label)) == 0:
            raise RequestError(
                f"session unknown or expired on this server: client {str(client_id)[:80]!r}, label "
                f"{str(label)[:80]!r} on this image is at step {step} for the client, but this server holds no step "
                f"of it (evicted, expired, or the server that held it restarted). Nothing was computed; send the "
                f"prompts again with reset_state=true to start a new session", status_code=409)

    # ---- start-up work yields to users (issue 30, item 4) --------------------------------------------------------
    def on_init_complete(self):
        """As monailabel's, except that the start-up scoring of every image is deferred until the server has been
        idle (no inference in flight, none for ``ENSAM_STARTUP_IDLE_S`` seconds, default 5): the first click right
        after start-up never shares the cores with it; once started it pauses for every later inference (the
        interactive gate)."""
        hold = not in_background_task()
        with monailabel_patches.startup_scoring_held(self, hold) as would_score:
            super().on_init_complete()
        if hold and would_score:
            idle = env_value("ENSAM_STARTUP_IDLE_S")  # lib.settings.ENV: a bad value stopped the start (lib.http)
            threading.Thread(target=self._startup_scoring_when_idle, args=(idle,), name="ensam-startup-scoring",
                             daemon=True).start()

    def _startup_scoring_when_idle(self, idle: float) -> None:
        gate().wait_idle(idle)
        gate().log(ev="startup_scoring", t=time.time())
        logger.info(f"start-up scoring: the server was idle for {idle:.1f}s; scoring every image in the background")
        try:
            self.async_scoring(None)
        except Exception:  # noqa: BLE001 - a failed start-up scoring must not take the server down
            logger.exception("start-up scoring could not be started")

    def info(self):
        """monailabel's ``/info`` plus, per model, the weights the next request will be answered with (name, mtime
        and ``weights_version``, a fingerprint of the file's bytes, the same on every replica that shares the model
        folder) and the interactive gate's counters."""
        meta = super().info()
        weights = {}
        for name, c in self.models.items():
            provider = getattr(c, "provider", None)
            if provider is not None:
                weights[name] = provider.weights_info()
        meta["weights"] = weights
        meta["interactive_gate"] = gate().stats()
        return meta
