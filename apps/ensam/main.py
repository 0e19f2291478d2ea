"""MONAI Label app for ENSAM, a small promptable 3D segmentation model.

Start: ``make serve`` (or ``monailabel start_server --app apps/ensam --studies <folder or DICOMweb URL>
--conf models ensam --uvicorn_app lib.server:app`` with apps/ensam on PYTHONPATH).

Tasks: infer ``ensam`` (interactive, deepgrow type: clicks, ROI/boxes, previous result, undo) and ``ensam_seg``
(prompt-free segmentation of the known label names); train ``ensam``; scoring ``novelty`` and ``uncertainty``;
strategies ``first``, ``random``, ``novelty``, ``uncertainty``; batch inference with an optional prompt manifest.
"""

import logging
import os
import sys
from typing import Dict

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

_APP_DIR = os.path.dirname(os.path.realpath(__file__))
if _APP_DIR not in sys.path:  # lib.* is imported lazily later (engine, training): keep the app folder importable
    sys.path.insert(0, _APP_DIR)

from lib.configs.ensam import EnsamConfig  # noqa: E402
from lib.infers.batch import EnsamBatchInfer  # noqa: E402

logger = logging.getLogger(__name__)

CONFIGS = {"ensam": EnsamConfig}


class EnsamApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
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
        strategies: Dict[str, Strategy] = {"first": First(), "random": Random()}
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
        return EnsamBatchInfer(self._infers)

    def _download_dcmqi_tools(self):
        """monailabel fetches dcmqi (DICOM SEG writer) from GitHub whenever the datastore is DICOMweb, and the app
        fails to start without internet access. Without it only ``output=dicom_seg`` is unavailable."""
        try:
            super()._download_dcmqi_tools()
        except Exception as e:  # noqa: BLE001 - offline, proxy, ...
            logger.warning(f"dcmqi tools not available ({type(e).__name__}: {e}); DICOM SEG output "
                           f"(output=dicom_seg) is disabled, everything else works")

    def datastore(self):
        """The datastore, re-read first if another process (batch inference, scoring, training run as
        subprocesses) rewrote a local datastore's file: cheap (one stat) and keeps this process from writing
        back a stale copy when datastore auto-reload is off."""
        ds = self._datastore
        reload = getattr(ds, "_init_from_datastore_file", None)
        if isinstance(ds, LocalDatastore) and callable(reload):
            reload()
        return ds
