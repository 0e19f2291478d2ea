"""The ``ensam`` train task: fine-tune from the labels saved in the datastore (tag ``final``).

It subclasses monailabel's plain :class:`TrainTask` (no ignite, no MLflow: tracking is off, so a Slicer "Train"
click just works) and is thin: it checks the request (:meth:`EnsamTrain.parse_request`, also called by the server
before a training starts) and hands it to :class:`lib.training.finetune_job.FinetuneJob`, which gathers the cases
(:mod:`lib.training.datastore_cases`), splits them, runs ``finetune`` (one process, or one per device for
``multi_gpu`` / ``cpu_processes``), publishes the best validated weights to ``model/ensam.pt`` as one artefact and
writes the statistics that ``/info`` shows (``train_stats``).

Request (``POST /train/ensam`` JSON body; every key optional): ``max_seconds`` (time budget, default 600),
``max_steps`` (0 = no limit), ``val_every`` (steps; 0 = about 5 times in the budget), ``val_split``,
``learning_rate``, ``optimizer`` (muon|adamw), ``labels`` (names to train, default all saved ones), ``concept``,
``pretrained`` (start from the current weights), ``seed``, ``device``, ``multi_gpu``, ``gpus``, ``cpu_processes``,
``rehearsal`` (fraction of steps on unnamed pre-training-style objects drawn on the same images, against forgetting).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Optional, Sequence

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.infers.request_parsing import parse_bool
from lib.training.finetune_job import FinetuneJob, cuda_available


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, (list, tuple)) and v else v


class EnsamTrain(TrainTask):
    def __init__(
        self,
        model_dir: str,
        weight_paths: Sequence[str],
        network_config: Optional[dict] = None,
        extra_names: Sequence[str] = (),
        num_labels: int = 128,
        description: str = "Fine-tune ENSAM on the datastore's final labels (simulated boxes and clicks)",
        config: Optional[dict] = None,
        publish_path: Optional[str] = None,
    ):
        super().__init__(description)
        self.model_dir = model_dir
        self.job = FinetuneJob(weight_paths=list(weight_paths), publish_path=publish_path or list(weight_paths)[-1],
                               stats_path=os.path.join(model_dir, "train_stats.json"),
                               network_config=dict(network_config or {}), extra_names=list(extra_names),
                               num_labels=int(num_labels))
        self._config = {
            "device": ["cuda", "cpu"] if cuda_available() else ["cpu"],
            "max_seconds": 600,
            "max_steps": 0,
            "val_every": 0,
            "val_split": 0.2,
            "learning_rate": 5e-4,
            "optimizer": ["muon", "adamw"],
            "labels": "",
            "concept": True,
            "pretrained": True,
            "seed": 0,
            "multi_gpu": False,
            "gpus": "all",
            "cpu_processes": 1,
            "rehearsal": 0.3,
        }
        self._config.update(config or {})

    def config(self):
        return self._config

    def stats(self):
        """The training statistics (``train_stats.json``; a RUNNING run whose process is gone reads as ERROR)."""
        return self.job.stats()

    # ---- request -> plan ------------------------------------------------------------------------------------
    def parse_request(self, request: dict) -> dict:
        req = copy.deepcopy(self._config)
        req.update(copy.deepcopy(request or {}))
        out = dict(req)
        out["device"] = str(_first(req.get("device")) or "cpu")
        for k, cast in (("max_seconds", float), ("max_steps", int), ("val_every", int), ("val_split", float),
                        ("learning_rate", float), ("seed", int), ("rehearsal", float)):
            try:
                out[k] = cast(_first(req.get(k)))
            except (TypeError, ValueError):
                raise ValueError(f"train parameter {k!r} must be a number, got {req.get(k)!r}") from None
        if not 0.0 <= out["rehearsal"] < 1.0:
            raise ValueError(f"rehearsal must be in [0, 1), got {out['rehearsal']}")
        if not 0.0 <= out["val_split"] < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {out['val_split']}")
        if out["max_seconds"] <= 0 and out["max_steps"] <= 0:
            raise ValueError("give a positive max_seconds (time budget) or max_steps")
        if out["max_seconds"] <= 0:
            out["max_seconds"] = float("inf")
        out["optimizer"] = str(_first(req.get("optimizer")) or "muon").lower()
        if out["optimizer"] not in ("muon", "adamw"):
            raise ValueError(f"optimizer must be 'muon' or 'adamw', got {out['optimizer']!r}")
        out["concept"] = parse_bool(req.get("concept", True), "concept", default=True)
        labels = req.get("labels") or ""
        if isinstance(labels, str):
            labels = [s.strip() for s in labels.split(",") if s.strip()]
        out["labels"] = [str(s) for s in labels]
        out["pretrained"] = parse_bool(req.get("pretrained", True), "pretrained", default=True)
        out["multi_gpu"] = parse_bool(req.get("multi_gpu", False), "multi_gpu")
        out["gpus"] = str(_first(req.get("gpus")) or "all")
        try:
            out["cpu_processes"] = int(_first(req.get("cpu_processes", 1)))
        except (TypeError, ValueError):
            raise ValueError(f"cpu_processes must be an integer, got {req.get('cpu_processes')!r}") from None
        if not 1 <= out["cpu_processes"] <= max(1, os.cpu_count() or 1):
            raise ValueError(f"cpu_processes must be between 1 and the number of CPU cores ({os.cpu_count()}), "
                             f"got {out['cpu_processes']}")
        return out

    def __call__(self, request, datastore: Datastore):
        """request -> checked plan -> :meth:`FinetuneJob.run` -> the final statistics."""
        return self.job.run(self.parse_request(request), datastore)
