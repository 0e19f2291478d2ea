"""The ``ensam`` train task: fine-tune from the labels saved in the datastore (tag ``final``).

It subclasses monailabel's plain :class:`TrainTask` (no ignite, no MLflow: tracking is off, so a Slicer "Train"
click just works) and is thin: it checks the request (:meth:`EnsamTrain.parse_request`, also called by the server
before a training starts) and hands it to :class:`lib.training.finetune_job.FinetuneJob`, which gathers the cases
(:mod:`lib.training.datastore_cases`), splits them, runs ``finetune`` (one process, or one per device for
``multi_gpu`` / ``cpu_processes``), publishes the best validated weights to ``model/ensam.pt`` as one artefact and
writes the statistics that ``/info`` shows (``train_stats``).

Request (``POST /train/ensam`` JSON body; every key optional): ``max_seconds`` (time budget, default 600), ``max_steps``
(0 = no limit), ``val_every`` (steps; 0 = about 5 times in the budget), ``val_split``, ``learning_rate``, ``optimizer``
(muon|adamw), ``labels`` (names to train, default all saved ones), ``concept``, ``pretrained`` (start from weights, not
from scratch), ``start_from`` (``shipped``, the default: the app's shipped weights, trained on every saved label again,
so that rounds never add up their drift; ``latest``: the newest published weights, so that a round builds on the
previous round's), ``bf16`` (``auto``: bf16 autocast on CUDA and on CPUs with bf16 units, float32 elsewhere; ``on`` /
``off`` force it), ``keep_refiner`` (weights with a refiner for corrective steps keep it, untuned, beside the tuned main
weights; false: the tuned network answers every step), ``seed``, ``device``, ``multi_gpu``, ``gpus``, ``cpu_processes``,
``rehearsal`` (fraction of steps on unnamed pre-training-style objects drawn on the same images, against forgetting),
``anchor`` (after every step the weights move this fraction back toward the anchor's target, against forgetting; chosen
on the tuning data by ``python -m lib.experiments.finetune_forgetting``), ``anchor_to`` (``shipped``: the app's shipped
weights, also when a round starts from an earlier round's weights, so that rounds do not drift; ``start``: the round's
starting weights), ``rehearsal_atlases`` (fraction of the steps on the labelled structures of the reference atlases that
``ensam_seg`` uses, CT and MR, so that a site's labels of one modality do not make the network forget the other; the
atlases are subsampled and bounded in memory, see :func:`lib.training.finetune.atlas_volumes`), ``reference_tolerance``
(default 0.02: the most the box DSC on 32 structures per modality of those reference atlases, held out of the rehearsal,
may fall below the shipped weights' on any modality; past it the published weights are blended back toward the shipped
ones, the most tuned blend within it, :mod:`lib.training.reference_guard`; 1 = off).
Bounds (400 otherwise, nothing started): every number finite and within :data:`NUMBER_BOUNDS` (``max_seconds`` in
[0, 7 days], 0 = no time budget; ``max_steps`` and ``val_every`` in [0, 10^6]; ``val_split``, ``rehearsal``, ``anchor``
and ``rehearsal_atlases`` in [0, 1); ``reference_tolerance`` in [0, 1]; ``learning_rate`` in (0, 1]; ``seed`` in
[0, 2^32 - 1]), ``anchor_to`` one of :data:`ANCHOR_TO`, ``start_from`` one of :data:`START_FROM`, ``bf16`` one of
:data:`BF16`, at most 256 label names of at most 128 characters, the request at most 64 KiB of JSON.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Optional, Sequence

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.engine_parts import BF16_MODES
from lib.request_parsing import first_value, parse_bool
from lib.training.finetune_job import FinetuneJob, cuda_available


# The numbers of a request: finite and within these bounds, else 400 naming the parameter and its range (issue 25:
# {"max_seconds": "nan"} was accepted, the run failed and its NaN made /info a 500; "inf" ran without a limit).
# key: (type, low, high, low excluded, high excluded)
NUMBER_BOUNDS = {
    "max_seconds": (float, 0.0, 7 * 24 * 3600.0, False, False),  # 0: no time budget (max_steps > 0 then)
    "max_steps": (int, 0, 1_000_000, False, False),  # 0: no step limit (max_seconds > 0 then)
    "val_every": (int, 0, 1_000_000, False, False),  # 0: about 5 validations in the budget
    "val_split": (float, 0.0, 1.0, False, True),
    "learning_rate": (float, 0.0, 1.0, True, False),
    "seed": (int, 0, 2**32 - 1, False, False),
    "rehearsal": (float, 0.0, 1.0, False, True),
    "anchor": (float, 0.0, 1.0, False, True),
    "rehearsal_atlases": (float, 0.0, 1.0, False, True),
    "reference_tolerance": (float, 0.0, 1.0, False, False),  # 1: no reference guard
}
ANCHOR_TO = ("shipped", "start")  # what the anchor pulls toward
# which weights a run starts from (the first is the default): "shipped" since the loop measured it against "latest"
# (docs/LABELLING_LOOP.md, "Every round from the shipped weights"): better next answers on vertebrae and hippocampus,
# forgetting after round 2 0.074 -> 0.015 on vertebrae (0.123 -> 0.158 on hippocampus)
START_FROM = ("shipped", "latest")
BF16 = BF16_MODES  # bf16 autocast of the training steps (auto: where it pays, lib.engine_parts.use_bf16)
# the parameters with named values (the first is the default)
CHOICES = {"anchor_to": ANCHOR_TO, "start_from": START_FROM, "bf16": BF16}
MAX_LABEL_NAMES = 256  # label names of one request (10k names were a 500 while the job started anyway)
MAX_LABEL_NAME_CHARS = 128
MAX_REQUEST_BYTES = 64 * 1024  # the request as JSON (monailabel puts it on the training process's command line)


def _interval(key: str) -> str:
    cast, low, high, low_open, high_open = NUMBER_BOUNDS[key]
    return f"{'(' if low_open else '['}{cast(low)}, {cast(high)}{')' if high_open else ']'}"


def _label_names(labels: Any) -> list:
    """The request's ``labels`` (a comma-separated string or a list of names): at most :data:`MAX_LABEL_NAMES`
    names of 1 to :data:`MAX_LABEL_NAME_CHARS` characters, else ValueError naming the bound."""
    labels = labels or ""
    if isinstance(labels, str):
        labels = [s.strip() for s in labels.split(",") if s.strip()]
    if not isinstance(labels, (list, tuple)):
        raise ValueError(f"labels must be a comma-separated string or a list of label names, "
                         f"got {type(labels).__name__}")
    if len(labels) > MAX_LABEL_NAMES:
        raise ValueError(f"at most {MAX_LABEL_NAMES} label names per train request, got {len(labels)}")
    out = []
    for s in labels:
        if isinstance(s, bool) or not isinstance(s, (str, int)) or not str(s).strip() \
                or len(str(s)) > MAX_LABEL_NAME_CHARS:
            raise ValueError(f"a label name is a text of 1 to {MAX_LABEL_NAME_CHARS} characters, got "
                             f"{str(s)[:60]!r}{'...' if len(str(s)) > 60 else ''}")
        out.append(str(s).strip())
    return out


def default_rehearsal_folder(model_dir: str, weight_paths: Sequence[str] = ()) -> str:
    """The reference atlases for ``rehearsal_atlases`` when none is given: ``ensam_seg``'s default folder
    (:func:`lib.atlas.segment.default_atlas_folder` of the app), else the one beside the app that the shipped
    weights (the first of ``weight_paths``) really live in, e.g. an app copy whose weights are links (the labelling
    loop's); '' when neither exists."""
    from lib.atlas.segment import default_atlas_folder

    candidates = [default_atlas_folder(os.path.dirname(os.path.abspath(model_dir)))]
    shipped = [p for p in weight_paths if os.path.exists(p)][:1]
    if shipped:
        candidates.append(default_atlas_folder(os.path.dirname(os.path.dirname(os.path.realpath(shipped[0])))))
    return next((c for c in candidates if os.path.exists(os.path.join(c, "dataset.json"))), "")


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
        atlas_folder: Optional[str] = None,
    ):
        super().__init__(description)
        self.model_dir = model_dir
        if atlas_folder is None:
            atlas_folder = default_rehearsal_folder(model_dir, weight_paths)
        self.job = FinetuneJob(weight_paths=list(weight_paths), publish_path=publish_path or list(weight_paths)[-1],
                               stats_path=os.path.join(model_dir, "train_stats.json"),
                               network_config=dict(network_config or {}), extra_names=list(extra_names),
                               num_labels=int(num_labels), atlas_folder=atlas_folder or "")
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
            "keep_refiner": True,
            "seed": 0,
            "multi_gpu": False,
            "gpus": "all",
            "cpu_processes": 1,
            "rehearsal": 0.3,
            "anchor": 0.02,
            "anchor_to": list(ANCHOR_TO),
            "start_from": list(START_FROM),
            "bf16": list(BF16),
            "rehearsal_atlases": 0.5,
            "reference_tolerance": 0.02,
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
        out["device"] = str(first_value(req.get("device")) or "cpu")
        for k, (cast, low, high, low_open, high_open) in NUMBER_BOUNDS.items():
            v = first_value(req.get(k))
            try:
                out[k] = cast(v)
            except (TypeError, ValueError, OverflowError):
                out[k] = None
            n = out[k]
            if (n is None or not math.isfinite(n) or n < low or n > high or (low_open and n == low)
                    or (high_open and n == high)):
                raise ValueError(f"train parameter {k!r} must be a finite number in {_interval(k)}, got "
                                 f"{str(v)[:60]!r}")
        if out["max_seconds"] <= 0 and out["max_steps"] <= 0:
            raise ValueError("give a positive max_seconds (time budget) or max_steps")
        if out["max_seconds"] <= 0:
            out["max_seconds"] = float("inf")
        out["optimizer"] = str(first_value(req.get("optimizer")) or "muon").lower()
        if out["optimizer"] not in ("muon", "adamw"):
            raise ValueError(f"optimizer must be 'muon' or 'adamw', got {out['optimizer']!r}")
        for k, choices in CHOICES.items():
            out[k] = str(first_value(req.get(k)) or choices[0]).lower()
            if out[k] not in choices:
                raise ValueError(f"train parameter {k!r} must be one of {list(choices)}, got {str(req.get(k))[:60]!r}")
        out["concept"] = parse_bool(req.get("concept", True), "concept", default=True)
        out["labels"] = _label_names(req.get("labels"))
        out["pretrained"] = parse_bool(req.get("pretrained", True), "pretrained", default=True)
        out["keep_refiner"] = parse_bool(req.get("keep_refiner", True), "keep_refiner", default=True)
        out["multi_gpu"] = parse_bool(req.get("multi_gpu", False), "multi_gpu")
        out["gpus"] = str(first_value(req.get("gpus")) or "all")
        try:
            out["cpu_processes"] = int(first_value(req.get("cpu_processes", 1)))
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"cpu_processes must be an integer, "
                             f"got {str(req.get('cpu_processes'))[:60]!r}") from None
        if not 1 <= out["cpu_processes"] <= max(1, os.cpu_count() or 1):
            raise ValueError(f"cpu_processes must be between 1 and the number of CPU cores ({os.cpu_count()}), "
                             f"got {out['cpu_processes']}")
        size = len(json.dumps(request or {}, default=str))
        if size > MAX_REQUEST_BYTES:  # monailabel passes the request on the training process's command line
            raise ValueError(f"the train request is {size} bytes of JSON, at most {MAX_REQUEST_BYTES // 1024} KiB")
        return out

    def __call__(self, request, datastore: Datastore):
        """request -> checked plan -> :meth:`FinetuneJob.run` -> the final statistics."""
        return self.job.run(self.parse_request(request), datastore)
