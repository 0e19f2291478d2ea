"""Where a batch job's results go, and the unit of work that travels to a worker: below the job
(:mod:`lib.batch.job`, which plans and publishes) and its worker (:mod:`lib.batch.worker`, which writes), both
of which use them.

:class:`ResultStore` keeps one result per key under ``<out>/results/`` (the label map, then its record, each written
atomically by :mod:`lib.io.atomic`: the record is the "done" mark), failures under ``<out>/failed/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

from lib.io.atomic import atomic_write_bytes_from, atomic_write_json, remove_dead_temps

RECORD_FORMAT = "ensam-batch-result/1"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ResultStore:
    """The output folder of batch jobs: ``results/<stem>.<ext>`` + ``results/<stem>.json`` (the record, written
    last), ``failed/<stem>.json``, ``manifest.json``; ``<stem>`` = the study id made file-safe + ``--`` + key."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        self.results = os.path.join(self.out, "results")
        self.failed = os.path.join(self.out, "failed")

    @staticmethod
    def stem(study_id: str, key: str) -> str:
        return f"{_SAFE.sub('_', str(study_id))[:80]}--{key}"

    def record_path(self, study_id: str, key: str) -> str:
        return os.path.join(self.results, self.stem(study_id, key) + ".json")

    def mask_path(self, study_id: str, key: str, extension: str) -> str:
        return os.path.join(self.results, self.stem(study_id, key) + extension)

    def failure_path(self, study_id: str, key: str) -> str:
        return os.path.join(self.failed, self.stem(study_id, key) + ".json")

    def done(self, study_id: str, key: str) -> Optional[dict]:
        """The record of a finished result (None when there is none, or its label file is gone)."""
        try:
            with open(self.record_path(study_id, key)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        if rec.get("key") != key or not os.path.exists(os.path.join(self.results, rec.get("file") or "")):
            return None
        return rec

    def failure(self, study_id: str, key: str) -> Optional[dict]:
        try:
            with open(self.failure_path(study_id, key)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def publish(self, study_id: str, key: str, label_file: str, extension: str, record: dict) -> dict:
        """Publish a result: the label file copied in atomically, then its record (the "done" mark); a failure
        recorded by an earlier attempt is removed."""
        os.makedirs(self.results, exist_ok=True)
        dest = self.mask_path(study_id, key, extension)
        atomic_write_bytes_from(label_file, dest)
        record = dict(record, format=RECORD_FORMAT, study=study_id, key=key, file=os.path.basename(dest))
        atomic_write_json(record, self.record_path(study_id, key))
        try:
            os.remove(self.failure_path(study_id, key))
        except OSError:
            pass
        return record

    def record_failure(self, study_id: str, key: str, record: dict) -> dict:
        record = dict(record, format=RECORD_FORMAT, study=study_id, key=key)
        atomic_write_json(record, self.failure_path(study_id, key))
        return record

    def remove_dead_temporaries(self) -> int:
        """Temporary files of writers that died (a node killed mid-write); called once the job's workers are
        done."""
        return remove_dead_temps(self.out)


@dataclass
class Task:
    """One study's unit of work, as it travels to a worker (JSON)."""

    study: dict
    key: str
    request: dict

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    @staticmethod
    def from_json(text: str) -> "Task":
        return Task(**json.loads(text))
