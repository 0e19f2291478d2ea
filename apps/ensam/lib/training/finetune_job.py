"""One fine-tuning job on a datastore's labels, from a checked request to published weights. Plain Python (no
monailabel import); the ``ensam`` train task (:mod:`lib.trainers.ensam_train`) parses the request and calls
:meth:`FinetuneJob.run`.

* the cases: every image with a ``final`` label (:mod:`lib.training.datastore_cases`), a deterministic validation
  split (``val_split``);
* the label vocabulary: new names get new label tokens (stored in the published artefact); with ``concept`` on, the
  prompt-free mode of the trained names is trained too;
* the loop: :func:`lib.training.finetune.finetune` (simulated boxes and clicks as the evaluator does,
  interaction-unrolled), validation before / during / after, the best validated weights kept;
* against forgetting across rounds (issue 29, item 2): the ``anchor`` pulls toward the SHIPPED weights (the first
  existing of ``weight_paths``, the app's pretrained artefact) even when a round starts from the previous round's
  published weights (``anchor_to`` ``"start"``: toward the round's starting weights), and ``rehearsal_atlases`` mixes
  the labelled reference volumes of ``atlas_folder`` (the atlases ``ensam_seg`` uses: CT and MR, real labels) into
  the steps;
* publication: those weights, with their network config, contract and vocabulary, go to ``publish_path`` as ONE
  artefact by atomic rename (:func:`lib.weights.save_artefact`), so the infer tasks (which watch the file's mtime)
  pick them up without a restart and never read half a file;
* statistics (``train_stats.json``), updated every few seconds while training runs;
* CPU or GPU; several GPUs (one process per GPU, ``torch.distributed`` with NCCL) with ``multi_gpu`` and more than
  one GPU visible (``gpus``: "all" or a comma list of indices); on CPU, ``cpu_processes`` > 1 runs the same
  data-parallel training over gloo (see :mod:`lib.training.distributed`);
* several machines: the same plan as a file, run by every rank of a ``torchrun`` group (docs/SCALE_OUT.md)::

    python -m lib.configs.train_plan --studies <shared folder> --out plan.json [--request '{...}']
    torchrun --nnodes 2 --node_rank R --nproc-per-node 1 --rdzv_backend c10d --rdzv_endpoint HOST:29400 \
        -m lib.training.finetune_job run --plan plan.json
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..contract import read_contract
from ..io.atomic import atomic_write_json, pid_alive
from ..io.json_bounds import finite_or_none
from ..label_vocab import canonical, extend_vocab, load_vocab
from ..weights import load_artefact, read_meta, save_artefact
from .datastore_cases import labelled_items, load_cases, split_items

logger = logging.getLogger(__name__)

__all__ = ["FinetuneJob", "training_devices", "cuda_available", "PLAN_FORMAT"]

PLAN_FORMAT = "ensam-train-plan/1"


@dataclass
class FinetuneJob:
    """Where a job reads and writes: the weights to start from (the last one that exists), the published
    artefact, the statistics file; the network config of new weights and the names known besides the weights'."""

    weight_paths: List[str]
    publish_path: str
    stats_path: str
    network_config: Dict[str, Any] = field(default_factory=dict)
    extra_names: List[str] = field(default_factory=list)
    num_labels: int = 128
    atlas_folder: str = ""  # labelled reference volumes for rehearsal_atlases ('' = none)

    def vocab(self) -> Dict[str, int]:
        return load_vocab(self.weight_paths, self.extra_names, self.num_labels)

    def _existing_weights(self) -> List[str]:
        return [p for p in self.weight_paths if os.path.exists(p)]

    def init_weights(self) -> Optional[str]:
        existing = self._existing_weights()
        return existing[-1] if existing else None

    def shipped_weights(self) -> Optional[str]:
        """The app's shipped artefact (the first of ``weight_paths`` that exists), which the anchor pulls toward."""
        existing = self._existing_weights()
        return existing[0] if existing else None

    def anchor_target(self, req: dict, init_path: Optional[str], init, net) -> tuple:
        """(anchor weights {name: tensor} or None = the starting weights, a description for the statistics). The
        shipped weights with ``anchor_to`` ``"shipped"`` when the run starts from weights; the starting weights
        otherwise, and when the shipped network's parameters do not fit this one (another ``--conf network``)."""
        if req.get("anchor", 0.0) <= 0:
            return None, "off"
        if req.get("anchor_to", "shipped") != "shipped":
            return None, "start"
        if init is None:
            return None, "start (no initial weights: trained from scratch)"
        shipped = self.shipped_weights()
        if shipped is None:
            return None, "start (no shipped weights)"
        if init_path and os.path.abspath(shipped) == os.path.abspath(init_path):
            return init.state_dict, os.path.basename(shipped)
        sd = load_artefact(shipped).state_dict
        own = dict(net.named_parameters())
        if any(k in own and tuple(v.shape) != tuple(own[k].shape) for k, v in sd.items()) or not set(sd) & set(own):
            logger.warning(f"ensam train: {shipped} does not fit the network; the anchor pulls toward the start")
            return None, "start (the shipped weights do not fit the network)"
        return sd, os.path.basename(shipped)

    def rehearsal_volumes(self, req: dict) -> tuple:
        """(atlas volumes for ``rehearsal_atlases``, their names); none when it is 0 or the folder holds no
        labelled atlas (a warning; the run goes on without them)."""
        from .finetune import atlas_volumes

        if req.get("rehearsal_atlases", 0.0) <= 0 and req.get("reference_tolerance", 1.0) >= 1.0:
            return [], []
        vols = atlas_volumes(self.atlas_folder, seed=req["seed"]) if self.atlas_folder else []
        if not vols:
            logger.warning(f"ensam train: rehearsal_atlases {req.get('rehearsal_atlases', 0.0)} / reference_tolerance "
                           f"{req.get('reference_tolerance', 1.0)} but no labelled atlas in "
                           f"{self.atlas_folder or '(no atlas folder)'}; training without atlas rehearsal and "
                           f"without the reference guard")
        return vols, [v.name for v in vols]

    def stats(self) -> dict:
        """The training statistics (``train_stats.json``). A run recorded as RUNNING whose process is gone (killed,
        or the machine restarted) is reported as ERROR: it will never write its result. Non-finite numbers (NaN,
        Infinity: a diverged loss, or a NaN budget accepted before issue 25) read as None: a JSON answer cannot
        carry them, and /info was a 500 for every client while such a file existed."""
        if not os.path.exists(self.stats_path):
            return {}
        try:
            with open(self.stats_path) as f:
                stats = finite_or_none(json.load(f))
        except (OSError, ValueError, RecursionError):
            return {}
        if not isinstance(stats, dict):
            return {}
        pid = stats.get("pid")
        if stats.get("status") == "RUNNING" and isinstance(pid, int) and not pid_alive(pid):
            stats = dict(stats, status="ERROR",
                         error=f"the training process (pid {pid}) ended without finishing (killed?)")
        return stats

    def plan(self, req: dict, datastore) -> dict:
        """The plan of one training run from the checked request ``req`` (the train task's ``parse_request``) and
        ``datastore``'s final labels: items, split, vocabulary, initial weights, network config. Plain JSON data
        (:meth:`save_plan`), so the same plan runs in this process, in processes spawned here, or in every rank of
        a ``torchrun`` group on several machines (:func:`run_launched`). Nothing is written."""
        start = time.time()
        req = dict(req)
        vocab0 = self.vocab()
        req["labels"] = [canonical(n, vocab0) for n in req["labels"]]
        items = labelled_items(datastore, vocab0, req["labels"])
        if not items:
            msg = "no labelled images to train on: save labels (tag 'final') in the datastore first"
            if req["labels"]:
                msg += f" (with label names {req['labels']})"
            raise ValueError(msg)
        train_items, val_items = split_items(items, req["val_split"], req["seed"])
        names = sorted({n for it in items for n in it["labels"]})
        vocab = extend_vocab(self.vocab(), names, self.num_labels)
        init = None
        if req["pretrained"]:
            init = self.shipped_weights() if req.get("start_from") == "shipped" else self.init_weights()
        network_config = self.network_config or (read_meta(init).get("network") if init else None) or {}
        logger.info(
            f"ensam train: {len(train_items)} train / {len(val_items)} val images; labels {names}; "
            f"init {init}; device {req['device']}"
        )
        base_stats = {
            "name": "ensam",
            "start_ts": int(start),
            # 3D Slicer draws a progress bar from epoch/total_epochs and an accuracy bar from best_metric: here
            # epoch = optimiser steps, total_epochs = max_steps or the steps the time budget should allow
            "epoch": 0,
            "total_epochs": req["max_steps"] or 1,
            "best_metric": 0.0,
            "max_seconds": req["max_seconds"] if req["max_seconds"] != float("inf") else None,
            "train_images": [it["id"] for it in train_items],
            "val_images": [it["id"] for it in val_items],
            "label_names": {n: vocab[n] for n in names},
            "device": req["device"],
            "status": "RUNNING",
            "pid": os.getpid(),
        }
        return {
            "train_items": train_items,
            "val_items": val_items,
            "vocab": vocab,
            "init_weights": init,
            "network_config": network_config,
            "label_names": names,
            "request": req,
            "base_stats": base_stats,
            "start": start,
        }

    def run(self, req: dict, datastore) -> dict:
        """Train on ``datastore``'s final labels as the checked request ``req`` says (the train task's
        ``parse_request``); returns the final statistics. A failure is recorded in the statistics, then raised."""
        plan = self.plan(req, datastore)
        atomic_write_json(plan["base_stats"], self.stats_path)
        devices = training_devices(plan["request"])
        try:
            if len(devices) > 1:
                return self._run_distributed(plan, devices)
            return self.run_plan(plan)
        except Exception as e:
            self._failed(plan, e)
            raise

    def _failed(self, plan: dict, e: BaseException) -> None:
        atomic_write_json(dict(plan["base_stats"], status="ERROR", error=f"{type(e).__name__}: {e}",
                               total_time=_hms(time.time() - plan["start"])), self.stats_path)

    # ---- a plan as a file: the same run on the ranks of a torchrun group ---------------------------------------
    def save_plan(self, plan: dict, path: str) -> None:
        """Write the job (where it reads and publishes) and ``plan`` as one JSON file (atomically)."""
        job = {"weight_paths": self.weight_paths, "publish_path": self.publish_path, "stats_path": self.stats_path,
               "network_config": self.network_config, "extra_names": self.extra_names,
               "num_labels": self.num_labels, "atlas_folder": self.atlas_folder}
        atomic_write_json({"format": PLAN_FORMAT, "job": job, "plan": plan}, path)

    @classmethod
    def load_plan(cls, path: str) -> tuple:
        """(job, plan) of a file written by :meth:`save_plan`."""
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"{path} is not an ensam training plan ({PLAN_FORMAT})")
        return cls(**data["job"]), data["plan"]

    def run_launched(self, plan: dict) -> dict:
        """Run ``plan`` as one rank of a group started by ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``;
        NCCL on GPU ranks, gloo on CPU): every rank trains on its own samples with averaged gradients; rank 0 writes
        the statistics and publishes, exactly as a spawned run does. Returns this rank's result."""
        import torch
        import torch.distributed as dist

        from .distributed import init_from_launcher

        env, device = init_from_launcher(training_device(plan["request"]["device"]))
        if device == "cpu" and env.local_world_size > 1:  # the processes of one machine share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
        plan = dict(plan, start=time.time(),
                    base_stats=dict(plan["base_stats"], start_ts=int(time.time()), pid=os.getpid(), status="RUNNING",
                                    world_size=env.world_size, launcher="torchrun",
                                    nodes=env.world_size // max(env.local_world_size, 1)))
        logger.info(f"ensam train: rank {env.rank}/{env.world_size} (local {env.local_rank}) on {device}, "
                    f"backend {dist.get_backend()}")
        try:
            if env.rank == 0:
                atomic_write_json(plan["base_stats"], self.stats_path)
            return self.run_plan(plan, rank=env.rank, world_size=env.world_size, device=device)
        except Exception as e:
            if env.rank == 0:
                self._failed(plan, e)
            raise
        finally:
            dist.destroy_process_group()

    def _run_distributed(self, plan: dict, devices: List[str]) -> dict:
        """One process per device (``torch.multiprocessing.spawn``); rank 0 publishes and writes the stats."""
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:  # a free rendezvous port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        plan = dict(plan, base_stats=dict(plan["base_stats"], world_size=len(devices),
                                          devices=devices))
        logger.info(f"ensam train: torch.distributed data-parallel over {len(devices)} processes: {devices}")
        mp.spawn(_distributed_worker, nprocs=len(devices), args=(devices, port, self, plan), join=True)
        stats = self.stats()
        if stats.get("status") != "DONE":
            raise RuntimeError(f"distributed training did not finish: {stats.get('error') or stats.get('status')}")
        return stats

    def run_plan(self, plan: dict, rank: int = 0, world_size: int = 1, device: Optional[str] = None) -> dict:
        """The training itself (in every process of a data-parallel run); rank 0 publishes the weights."""
        import torch

        from ..engine import load_network
        from .finetune import finetune

        req = plan["request"]
        base_stats = plan["base_stats"]
        start = plan["start"]
        publish_path = self.publish_path
        vocab = plan["vocab"]
        device = device or training_device(req["device"])
        torch.manual_seed(req["seed"] + rank)

        cases = load_cases(plan["train_items"], vocab)
        if not cases:
            raise ValueError("none of the labelled images holds the requested structures")
        val_cases = load_cases(plan["val_items"], vocab) if plan["val_items"] else []
        val_on_train = not val_cases
        if val_on_train:  # a single labelled image: validate on it (best-weights selection still guards)
            val_cases = cases
        init = load_artefact(plan["init_weights"]) if plan["init_weights"] else None  # one read: weights + contract
        net = load_network(init, plan["network_config"] or None, device)
        contract = read_contract(init, net.config)  # the tuned weights keep their contract
        label_ids = {vocab[n] + 1: vocab[n] for n in plan["label_names"]} if req["concept"] else None
        anchor_weights, anchor_target = self.anchor_target(req, plan["init_weights"], init, net)
        atlases, atlas_names = self.rehearsal_volumes(req)
        against_forgetting = {"anchor": req.get("anchor", 0.0), "anchor_target": anchor_target,
                              "rehearsal": req["rehearsal"],
                              "rehearsal_atlases": req.get("rehearsal_atlases", 0.0) if atlases else 0.0,
                              "reference_tolerance": req.get("reference_tolerance", 1.0) if atlases else 1.0,
                              "atlases": atlas_names}
        base_stats = dict(base_stats, forgetting_guard=against_forgetting)
        last_write = [0.0]

        def progress(p: dict):
            if rank != 0 or time.time() - last_write[0] < 2.0:
                return
            last_write[0] = time.time()
            step, secs = int(p.get("step", 0)), float(p.get("seconds", 0.0))
            total = req["max_steps"] or 0
            if req["max_seconds"] != float("inf") and secs > 0:
                by_time = int(round(step * req["max_seconds"] / secs))
                total = min(total, by_time) if total else by_time
            s = dict(base_stats, epoch=step, total_epochs=max(total, step, 1), current_time=_hms(time.time() - start),
                     loss=round(float(p.get("loss") or 0.0), 5))
            atomic_write_json(s, self.stats_path)

        result = finetune(net, cases, max_seconds=req["max_seconds"], val_cases=val_cases, device=device,
                          label_ids=label_ids, lr=req["learning_rate"], optimizer=req["optimizer"],
                          max_steps=req["max_steps"], val_every=req["val_every"], keep_best=True,
                          seed=req["seed"] + rank, progress=progress, rank=rank, world_size=world_size,
                          rehearsal=req["rehearsal"], contract=contract, anchor=req.get("anchor", 0.0),
                          anchor_weights=anchor_weights,
                          rehearsal_atlases=against_forgetting["rehearsal_atlases"], rehearsal_volumes=atlases,
                          bf16=req.get("bf16", "auto"), reference_volumes=atlases,
                          reference_tolerance=against_forgetting["reference_tolerance"])
        del atlases, anchor_weights
        if rank != 0:
            return result

        best = (result.get("val_best") or {}).get("score")
        before = (result.get("val_before") or {}).get("score")
        meta = {"network": plan["network_config"] or net.config.to_dict(), "contract": contract.to_dict(),
                "trained_from": os.path.basename(plan["init_weights"] or "") or None,
                "labels_trained": plan["label_names"], "val_before": result.get("val_before"),
                "forgetting_guard": against_forgetting,
                "val_best": result.get("val_best"), "steps": result.get("steps"),
                "reference_guard": result.get("reference_guard"), "val_blended": result.get("val_blended"),
                # keep_refiner: the initial weights' refiner (trained for corrective steps) answers the corrections
                # after the round as before it, untuned; else the tuned network answers every step
                "refiner": ("kept" if req.get("keep_refiner", True) else "dropped")
                if init is not None and init.refiner is not None else None}
        refiner = init.refiner if meta["refiner"] == "kept" else None
        # one artefact (weights + network + contract + vocabulary [+ refiner]), published by one rename (lib.weights)
        save_artefact(publish_path, net.state_dict(), meta, vocabulary=vocab, refiner=refiner)
        logger.info(f"ensam train: published {publish_path} (validation score {before} -> {best})")

        stats = dict(base_stats)
        stats.update({k: v for k, v in result.items() if _jsonable(v)})
        stats.update({
            "status": "DONE",
            "epoch": int(result.get("steps", 0)),
            "total_epochs": int(result.get("steps", 0)),
            "total_time": _hms(time.time() - start),
            "total_seconds": round(time.time() - start, 1),
            "best_metric": best if best is not None else 0.0,
            "best_metric_before": before,
            "validated_on_training_images": val_on_train,
            "weights": os.path.basename(publish_path),
        })
        atomic_write_json(stats, self.stats_path)
        return stats


def training_devices(req: dict) -> List[str]:
    """The data-parallel devices, one process each: several GPUs with ``multi_gpu``, several CPU processes with
    ``cpu_processes`` > 1 on CPU, else the single training device."""
    device = training_device(req["device"])
    if device.startswith("cuda"):
        if not req["multi_gpu"]:
            return [device]
        import torch

        n = torch.cuda.device_count()
        if req["gpus"] in ("", "all"):
            ids = list(range(n))
        else:
            try:
                ids = [int(g) for g in req["gpus"].split(",") if g.strip()]
            except ValueError:
                raise ValueError(f"gpus must be 'all' or a comma list of GPU indices, got {req['gpus']!r}") from None
            bad = [g for g in ids if not 0 <= g < n]
            if bad:
                raise ValueError(f"gpus {bad} do not exist ({n} visible)")
        return [f"cuda:{g}" for g in ids] or [device]
    return ["cpu"] * req["cpu_processes"]


def training_device(name: str) -> str:
    if name.startswith("cuda") and not cuda_available():
        logger.warning("ensam train: CUDA requested but not available; training on CPU")
        return "cpu"
    return name


def _distributed_worker(rank: int, devices: List[str], port: int, job: FinetuneJob, plan: dict):
    import torch
    import torch.distributed as dist

    from .distributed import init_process_group

    world_size = len(devices)
    device = devices[rank]
    if device == "cpu":  # the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    os.environ["MASTER_PORT"] = str(port)
    init_process_group(rank, world_size, device)  # MASTER_ADDR: loopback unless set
    try:
        job.run_plan(plan, rank=rank, world_size=world_size, device=device)
    except Exception as e:
        if rank == 0:
            atomic_write_json(dict(plan["base_stats"], status="ERROR", error=f"{type(e).__name__}: {e}",
                                   total_time=_hms(time.time() - plan["start"])), job.stats_path)
        raise
    finally:
        dist.destroy_process_group()


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------- command line
def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lib.training.finetune_job",
        description="Run the ensam train task's plan (written by python -m lib.configs.train_plan) in every rank "
                    "of a torchrun group (one or several machines; docs/SCALE_OUT.md), or alone as one process.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a plan: under torchrun in every rank, or alone as one process")
    r.add_argument("--plan", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)s] %(levelname)s %(message)s")

    from .distributed import launch_env

    job, plan = FinetuneJob.load_plan(args.plan)
    if launch_env() is not None:
        job.run_launched(plan)
    else:  # one process, as the train task without multi_gpu / cpu_processes
        atomic_write_json(dict(plan["base_stats"], pid=os.getpid()), job.stats_path)
        try:
            job.run_plan(dict(plan, start=time.time()))
        except Exception as e:
            job._failed(plan, e)
            raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
