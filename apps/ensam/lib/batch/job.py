"""One batch job: the studies, what to segment in each, where the results go, and the two backends that run it.

A job is a list of :class:`Study` (a local file or DICOM folder, or a DICOMweb series) and a :class:`BatchJob`
(the weights, the engine settings, the prompt-free names, the output folder). Each study gets ONE result key, a
hash of (the study's identity, the weights' sha256, the request: its prompts or names, the engine settings, the
output format); :class:`lib.batch.store.ResultStore` keeps one result per key under ``<out>/results/`` (the label
map, then its record, each written atomically by :mod:`lib.io.atomic`: the record is the "done" mark). Before
anything runs the driver drops the studies whose key is already done, so a re-run after a kill does only the
missing ones; the same check is made again by the worker right before it starts a study (a retried task after a
lost node finds the result of the first attempt and does nothing).

Backends, same worker code (:class:`lib.batch.worker.Segmenter`, which loads the weights once per worker):

* ``local``: the Segmenter in this process, one study after the other (no cluster needed);
* ``ray``: a Ray Data dataset of the studies, ``map_batches(Segmenter, compute=ActorPoolStrategy(size=n))``: n
  actors (CPU or GPU ones), each built once; Ray restarts actors and retries tasks of a node that dies.

A study that fails (unreadable file, prompts outside the image, ...) gets ``<out>/failed/<stem>.json`` with the
reason; the others go on. At the end ``<out>/manifest.json`` lists every study of the job (ok / failed / missing,
key, files, reason), read back from the store (not from what the workers answered, which a lost node can drop).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

from lib.batch.store import ResultStore, Task
from lib.batch.worker import Segmenter
from lib.io.atomic import atomic_write_json
from lib.io.digest import sha256_file

logger = logging.getLogger(__name__)

BACKENDS = ("local", "ray")


@dataclass
class Study:
    """One input: ``path`` (a volume file or a DICOM series folder) or ``dicomweb`` ({"url", "series", optional
    "study", "qido_prefix", "wado_prefix", "stow_prefix"}); ``objects``: the manifest's prompts, one dict per
    object ({"label", "points", "point_labels", "boxes"}, already parsed), None for a prompt-free study."""

    id: str
    path: str = ""
    dicomweb: Optional[Dict[str, str]] = None
    objects: Optional[List[dict]] = None

    def identity(self) -> dict:
        """What names the input in the result key: a DICOMweb series by its UIDs (immutable in DICOM), a file or
        folder by id, size and modification time (a replaced file gets a new result)."""
        if self.dicomweb:
            return {"id": self.id, "dicomweb_series": str(self.dicomweb.get("series") or self.id)}
        try:
            st = os.stat(self.path)
            if os.path.isdir(self.path):  # a DICOM folder: its files' sizes and times
                files = sorted(os.scandir(self.path), key=lambda e: e.name)
                return {"id": self.id, "files": [[e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in files]}
            return {"id": self.id, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except OSError:
            return {"id": self.id, "missing": self.path}


@dataclass
class BatchJob:
    """What every study of a job shares. ``names``: prompt-free label names (for the studies without
    ``objects``), segmented by their learned token (:meth:`lib.engine.EnsamEngine.segment_labels`); ``vocab``:
    name -> token id of the weights; the voxel value of a name is its token id + 1 (as ``ensam_seg`` answers).
    ``engine_kwargs``: :class:`lib.engine.EnsamEngine` keyword arguments (e.g. ``{"config": EngineConfig(...)}``).
    Workers: ``workers`` actors (0: as many as the cluster's CPUs / GPUs allow), each with ``cpus_per_worker``
    CPUs and ``gpus_per_worker`` GPUs (> 0: GPU workers); ``threads``: torch threads per worker (0: a Ray
    worker's CPUs; torch's default in the local backend)."""

    out: str
    weights: Optional[str] = None
    network_config: Optional[dict] = None
    engine_kwargs: Dict[str, Any] = field(default_factory=dict)
    names: List[str] = field(default_factory=list)
    vocab: Dict[str, int] = field(default_factory=dict)
    device: str = "auto"
    threads: int = 0
    workers: int = 0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    extension: str = ".nii.gz"
    dicom_seg: bool = True  # a DICOMweb study's result goes back to its store as DICOM SEG

    def worker_conf(self, weights_sha256: str, backend: str = "local") -> dict:
        """What a worker needs to build itself (picklable: the engine settings travel as objects). Threads: the
        job's, else a Ray worker's CPUs, else (local) torch's own choice."""
        threads = self.threads or (int(max(1, self.cpus_per_worker)) if backend == "ray" else 0)
        return {"out": self.out, "weights": self.weights, "weights_sha256": weights_sha256,
                "network_config": self.network_config, "engine_kwargs": dict(self.engine_kwargs),
                "device": self.device, "threads": threads, "extension": self.extension, "dicom_seg": self.dicom_seg}

    def request_of(self, study: Study) -> dict:
        """The request part of a study's result key (and of its record)."""
        base = {"engine": _engine_repr(self.engine_kwargs), "network": self.network_config,
                "extension": self.extension, "dicom_seg": bool(self.dicom_seg and study.dicomweb)}
        if study.objects is not None:
            return dict(base, kind="prompts", objects=study.objects)
        return dict(base, kind="names", names={n: int(self.vocab[n]) for n in self.names})


def _engine_repr(kwargs: Dict[str, Any]) -> str:
    text = repr(sorted((k, v) for k, v in kwargs.items()))
    return re.sub(r" at 0x[0-9a-f]+", "", text)  # an object without a value repr: its class name only


def weights_sha256(path: Optional[str]) -> str:
    """The weights' version: sha256 of the file's bytes ("untrained" without a file)."""
    if not path:
        return "untrained"
    return sha256_file(path)


def result_key(study: Study, weights_sha: str, request: dict) -> str:
    """THE key of one result: sha256 of (the study's identity, the weights' version, the request)."""
    text = json.dumps({"study": study.identity(), "weights": weights_sha, "request": request}, sort_keys=True,
                      separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def plan(job: BatchJob, studies: Iterable[Study], weights_sha: str) -> List[Task]:
    """One task per study (the same id twice is an error: one result per study)."""
    tasks, seen = [], set()
    for s in studies:
        if s.id in seen:
            raise ValueError(f"study {s.id!r} is listed twice")
        seen.add(s.id)
        if s.objects is None:
            unknown = [n for n in job.names if n not in job.vocab]
            if unknown or not job.names:
                raise ValueError(f"study {s.id!r}: no prompts and no known label names to segment "
                                 f"(names {job.names}, unknown {unknown})")
        request = job.request_of(s)
        tasks.append(Task(dataclasses.asdict(s), result_key(s, weights_sha, request), request))
    return tasks


def run_job(job: BatchJob, studies: Iterable[Study], backend: str = "local", ray_address: Optional[str] = None,
            progress: bool = True, on_record: Optional[Callable[[dict, int, int], None]] = None) -> dict:
    """Run ``job`` over ``studies`` on ``backend`` ("local" or "ray"; ``ray_address``: None/"" = the Ray of this
    process, or a new local one; "auto"; "host:port"; "ray://host:port"). Only the studies without a result are
    run. ``on_record(record, n, total)`` is called in the driver for each study as it finishes (those of an earlier
    run first, with ``skipped``). Returns the
    manifest (also written to ``<out>/manifest.json``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    t0 = time.time()
    store = ResultStore(job.out)
    os.makedirs(store.out, exist_ok=True)
    sha = weights_sha256(job.weights)
    tasks = plan(job, studies, sha)
    done = {t.key: store.done(t.study["id"], t.key) for t in tasks}
    todo = [t for t in tasks if done[t.key] is None]
    logger.info(f"ensam batch: {len(tasks)} studies, {len(tasks) - len(todo)} already done, {len(todo)} to run "
                f"on {backend}; weights {os.path.basename(job.weights or '') or 'none'} ({sha[:12]})")
    n = 0
    error = ""

    def seen(rec: dict, count: bool = True) -> None:
        nonlocal n
        n += 1
        if count:
            bar.update(1)
        if on_record is not None:
            on_record(rec, n, len(tasks))

    for t in tasks:  # those done by an earlier run first
        if done[t.key] is not None:
            seen(dict(done[t.key], status="ok", skipped=True), count=False)
    bar = _progress(len(todo), progress)

    try:
        if todo:
            runner = _run_local if backend == "local" else _run_ray
            runner(job, sha, todo, seen, ray_address)
    except Exception as e:  # noqa: BLE001 - the manifest says which studies have no result, a re-run does them
        error = f"{type(e).__name__}: {e}"
        logger.error(f"ensam batch: the {backend} backend stopped: {error}")
    finally:
        bar.close()
    store.remove_dead_temporaries()
    return write_manifest(store, job, tasks, sha, backend, time.time() - t0, len(todo), error)


def write_manifest(store: ResultStore, job: BatchJob, tasks: List[Task], sha: str, backend: str, seconds: float,
                   ran: int, error: str = "") -> dict:
    """The job's manifest, from the store: every study ok (its record), failed (the reason) or missing."""
    entries = []
    for t in tasks:
        sid = t.study["id"]
        rec = store.done(sid, t.key)
        if rec is not None:
            entries.append({"study": sid, "status": "ok", "key": t.key, "file": rec["file"],
                            "record": os.path.basename(store.record_path(sid, t.key)),
                            "label_names": rec.get("label_names"), "dicom_seg": rec.get("dicom_seg")})
            continue
        fail = store.failure(sid, t.key)
        reason = (fail or {}).get("reason") or (f"no result: {error}" if error else "no result")
        entries.append({"study": sid, "status": "failed" if fail else "missing", "key": t.key, "reason": reason})
    counts = {s: sum(e["status"] == s for e in entries) for s in ("ok", "failed", "missing")}
    manifest = {"format": "ensam-batch-manifest/1", "backend": backend, "weights": os.path.basename(job.weights or ""),
                "weights_sha256": sha, "studies": entries, "counts": counts, "ran": ran,
                "seconds": round(seconds, 3), "error": error or None}
    atomic_write_json(manifest, os.path.join(store.out, "manifest.json"))
    return manifest


# ------------------------------------------------------------------------------------------------------- backends
def _run_local(job: BatchJob, sha: str, todo: List[Task], seen, ray_address=None) -> None:
    seg = Segmenter(job.worker_conf(sha, "local"))
    for t in todo:
        seen(seg.run(t))


def _run_ray(job: BatchJob, sha: str, todo: List[Task], seen, ray_address: Optional[str]) -> None:
    import numpy as np
    import ray
    import ray.data

    started = False
    remote_env: Dict[str, Any] = {}
    # no usage reports from a hospital's servers (Ray sends them by default; offline they only log errors)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():  # workers on other machines get this code as it is here (uploaded by Ray)
        ray.init(address=ray_address or None, runtime_env={"py_modules": [_lib_dir()]},
                 logging_level=logging.WARNING, log_to_driver=False)
        started = True
    else:  # Ray started by the caller: the app folder must be at the same path on every node
        app_dir = os.path.dirname(_lib_dir())
        remote_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
            p for p in (app_dir, os.environ.get("PYTHONPATH", "")) if p)}}
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver's own bar (tqdm) counts studies
        workers = job.workers or _cluster_workers(ray.cluster_resources(), job)
        ds = ray.data.from_items([{"task": t.to_json()} for t in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            Segmenter, fn_constructor_kwargs={"conf": job.worker_conf(sha, "ray")}, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(todo)))),
            num_cpus=job.cpus_per_worker, num_gpus=job.gpus_per_worker or None,
            **({"runtime_env": remote_env} if remote_env else {}))
        for row in ds.iter_rows():
            seen(json.loads(str(np.asarray(row["record"]).item() if hasattr(row["record"], "shape")
                                else row["record"])))
    finally:
        if started:
            ray.shutdown()


def _cluster_workers(resources: dict, job: BatchJob) -> int:
    if job.gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) // job.gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // max(job.cpus_per_worker, 1e-3)))


def _lib_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc="ensam batch", unit="study")
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass

    class _Silent:
        def update(self, n: int) -> None:
            pass

        def close(self) -> None:
            pass

    return _Silent()
