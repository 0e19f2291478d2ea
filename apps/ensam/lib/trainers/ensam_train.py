"""The ``ensam`` train task: fine-tune from the labels saved in the datastore (tag ``final``).

It subclasses monailabel's plain :class:`TrainTask` (no ignite, no MLflow: tracking is off, so a Slicer "Train"
click just works) and delegates the loop to ``lib.training.finetune`` (simulated boxes and clicks as the evaluator
does, interaction-unrolled). This module owns what is MONAI Label specific:

* the datalist: every image with a ``final`` label, its label names read from the label info that Slicer/OHIF
  save (``label_info: [{"name": .., "idx": ..}]``) or from the app's known names;
* a deterministic validation split (``val_split``);
* the label vocabulary: new names get new label tokens (stored in the published artefact); with ``concept`` on, the
  prompt-free mode of the trained names is trained too;
* publication: the best validated weights (``finetune`` keeps them), with their network config, contract and
  vocabulary, go to ``model/ensam.pt`` as ONE artefact by atomic rename (:func:`lib.weights.save_artefact`), so
  the infer tasks (which watch the file's mtime) pick them up without a restart and never read half a file;
* statistics for ``/info`` (``train_stats``), updated every few seconds while training runs;
* CPU or GPU; several GPUs (one process per GPU, ``torch.distributed`` with NCCL) when ``multi_gpu`` is set and
  more than one GPU is visible (``gpus``: "all" or a comma list of indices); on CPU, ``cpu_processes`` > 1 runs
  the same data-parallel training over gloo (several processes sharing the cores; this is how the distributed
  path is tested on machines without GPUs). See :mod:`lib.training.distributed`.

Request (``POST /train/ensam`` JSON body; every key optional): ``max_seconds`` (time budget, default 600),
``max_steps`` (0 = no limit), ``val_every`` (steps; 0 = about 5 times in the budget), ``val_split``,
``learning_rate``, ``optimizer`` (muon|adamw), ``labels`` (names to train, default all saved ones), ``concept``,
``pretrained`` (start from the current weights), ``seed``, ``device``, ``multi_gpu``, ``gpus``, ``cpu_processes``,
``rehearsal`` (fraction of steps on unnamed pre-training-style objects drawn on the same images, against forgetting).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import random
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.contract import read_contract
from lib.io.atomic import pid_alive
from lib.io.label_vocab import atomic_write_json, canonical, extend_vocab, load_vocab, output_ids
from lib.infers.request_parsing import parse_bool
from lib.weights import load_artefact, read_meta, save_artefact

logger = logging.getLogger(__name__)


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, (list, tuple)) and v else v


def _process_alive(pid: int) -> bool:
    return pid_alive(pid)


def label_names_of(label_info: dict, fallback: Dict[int, str]) -> Dict[str, int]:
    """name -> voxel value of a saved label, from the info the clients store with it."""
    names: Dict[str, int] = {}
    for key in ("label_info", "labels"):
        items = label_info.get(key)
        if isinstance(items, list):
            for n, it in enumerate(items):
                if isinstance(it, dict) and it.get("name"):
                    v = it.get("idx", it.get("id", n + 1))
                    names[str(it["name"])] = int(v)
        elif isinstance(items, dict):
            names.update({str(k): int(v) for k, v in items.items()})
        if names:
            break
    if not names:
        ln = (label_info.get("params") or {}).get("label_names")
        if isinstance(ln, dict):
            names = {str(k): int(v) for k, v in ln.items()}
    if not names:
        names = {name: value for value, name in fallback.items()}
    return {k: v for k, v in names.items() if k.lower() != "background" and v > 0}


def split_items(items: List[dict], val_split: float, seed: int = 0) -> Tuple[List[dict], List[dict]]:
    items = sorted(items, key=lambda d: d["id"])
    if len(items) < 2 or val_split <= 0:
        return items, []
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    n_val = min(len(items) - 1, max(1, int(round(val_split * len(items)))))
    val_idx = set(order[:n_val])
    return [it for i, it in enumerate(items) if i not in val_idx], [it for i, it in enumerate(items) if i in val_idx]


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
        self.weight_paths = list(weight_paths)
        self.publish_path = publish_path or self.weight_paths[-1]
        self.network_config = dict(network_config or {})
        self.extra_names = list(extra_names)
        self.num_labels = int(num_labels)
        self.stats_path = os.path.join(model_dir, "train_stats.json")
        self._config = {
            "device": ["cuda", "cpu"] if _cuda_available() else ["cpu"],
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
        """The training statistics (``train_stats.json``). A run recorded as RUNNING whose process is gone (killed,
        or the machine restarted) is reported as ERROR: it will never write its result."""
        if os.path.exists(self.stats_path):
            try:
                with open(self.stats_path) as f:
                    stats = json.load(f)
            except (OSError, ValueError):
                return {}
            pid = stats.get("pid") if isinstance(stats, dict) else None
            if stats.get("status") == "RUNNING" and isinstance(pid, int) and not _process_alive(pid):
                stats = dict(stats, status="ERROR",
                             error=f"the training process (pid {pid}) ended without finishing (killed?)")
            return stats
        return {}

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

    def datalist(self, datastore: Datastore, wanted: Sequence[str]) -> List[dict]:
        """Images with a ``final`` label and the names (present in the label file) -> voxel value."""
        from lib.io.imageio import load_volume

        fallback = {v: k for k, v in output_ids(self._vocab()).items()}
        items = []
        for image_id in sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL)):
            label_uri = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
            image_uri = datastore.get_image_uri(image_id)
            if not label_uri or not image_uri:
                continue
            info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL) or {}
            vocab = self._vocab()
            names = {canonical(k, vocab): v for k, v in label_names_of(info, fallback).items()}
            present = set(np.unique(np.asarray(load_volume(label_uri).array)).tolist())
            names = {k: v for k, v in names.items() if v in present}
            if wanted:
                names = {k: v for k, v in names.items() if k in wanted}
            if not names:
                continue
            items.append({"id": image_id, "image": image_uri, "label": label_uri, "labels": names})
        return items

    # ---- run ------------------------------------------------------------------------------------------------
    def __call__(self, request, datastore: Datastore):
        start = time.time()
        req = self.parse_request(request)
        vocab0 = self._vocab()
        req["labels"] = [canonical(n, vocab0) for n in req["labels"]]
        items = self.datalist(datastore, req["labels"])
        if not items:
            msg = "no labelled images to train on: save labels (tag 'final') in the datastore first"
            if req["labels"]:
                msg += f" (with label names {req['labels']})"
            raise ValueError(msg)
        train_items, val_items = split_items(items, req["val_split"], req["seed"])
        names = sorted({n for it in items for n in it["labels"]})
        vocab = extend_vocab(self._vocab(), names, self.num_labels)
        init = self._init_weights() if req["pretrained"] else None
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
        atomic_write_json(base_stats, self.stats_path)

        plan = {
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
        devices = self._devices(req)
        try:
            if len(devices) > 1:
                return self._run_distributed(plan, devices)
            return self.run(plan)
        except Exception as e:
            failed = dict(base_stats, status="ERROR", error=f"{type(e).__name__}: {e}",
                          total_time=_hms(time.time() - start))
            atomic_write_json(failed, self.stats_path)
            raise

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

    def load_cases(self, items: List[dict], vocab: Dict[str, int]) -> List[dict]:
        """Datastore items -> finetune cases. Each name gets the voxel value token id + 1 in every case, so the
        same structure has the same value whatever order the client saved its segments in."""
        from lib.io.imageio import load_volume

        cases = []
        for it in items:
            img = load_volume(it["image"])
            lab = load_volume(it["label"])
            if lab.shape != img.shape:
                raise ValueError(f"{it['id']}: label shape {lab.shape} differs from image shape {img.shape}")
            src = np.asarray(lab.array)
            out = np.zeros(src.shape, dtype=np.int16)
            for name, value in it["labels"].items():
                out[src == value] = vocab[name] + 1
            if not out.any():
                logger.warning(f"ensam train: {it['id']}: none of {sorted(it['labels'])} is present; skipped")
                continue
            cases.append({"image": np.asarray(img.array, dtype=np.float32), "label": out, "affine": img.affine,
                          "name": it["id"]})
        return cases

    def run(self, plan: dict, rank: int = 0, world_size: int = 1, device: Optional[str] = None) -> dict:
        import torch

        from lib.engine import load_network
        from lib.training.finetune import finetune

        req = plan["request"]
        base_stats = plan["base_stats"]
        start = plan["start"]
        publish_path = self.publish_path
        vocab = plan["vocab"]
        device = device or _device(req["device"])
        torch.manual_seed(req["seed"] + rank)

        cases = self.load_cases(plan["train_items"], vocab)
        if not cases:
            raise ValueError("none of the labelled images holds the requested structures")
        val_cases = self.load_cases(plan["val_items"], vocab) if plan["val_items"] else []
        val_on_train = not val_cases
        if val_on_train:  # a single labelled image: validate on it (best-weights selection still guards)
            val_cases = cases
        init = load_artefact(plan["init_weights"]) if plan["init_weights"] else None  # one read: weights + contract
        net = load_network(init, plan["network_config"] or None, device)
        contract = read_contract(init, net.config)  # the tuned weights keep their contract
        label_ids = {vocab[n] + 1: vocab[n] for n in plan["label_names"]} if req["concept"] else None
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
                          rehearsal=req["rehearsal"], contract=contract)
        if rank != 0:
            return result

        best = (result.get("val_best") or {}).get("score")
        before = (result.get("val_before") or {}).get("score")
        meta = {"network": plan["network_config"] or net.config.to_dict(), "contract": contract.to_dict(),
                "trained_from": os.path.basename(plan["init_weights"] or "") or None,
                "labels_trained": plan["label_names"], "val_before": result.get("val_before"),
                "val_best": result.get("val_best"), "steps": result.get("steps")}
        # one artefact (weights + network + contract + vocabulary), published by one rename (lib.weights)
        save_artefact(publish_path, net.state_dict(), meta, vocabulary=vocab)
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

    def _vocab(self) -> Dict[str, int]:
        return load_vocab(self.weight_paths, self.extra_names, self.num_labels)

    def _init_weights(self) -> Optional[str]:
        existing = [p for p in self.weight_paths if os.path.exists(p)]
        return existing[-1] if existing else None

    @staticmethod
    def _devices(req: dict) -> List[str]:
        """The data-parallel devices, one process each: several GPUs with ``multi_gpu``, several CPU processes
        with ``cpu_processes`` > 1 on CPU, else the single training device."""
        device = _device(req["device"])
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
                    raise ValueError(
                        f"gpus must be 'all' or a comma list of GPU indices, got {req['gpus']!r}") from None
                bad = [g for g in ids if not 0 <= g < n]
                if bad:
                    raise ValueError(f"gpus {bad} do not exist ({n} visible)")
            return [f"cuda:{g}" for g in ids] or [device]
        return ["cpu"] * req["cpu_processes"]


def _device(name: str) -> str:
    if name.startswith("cuda") and not _cuda_available():
        logger.warning("ensam train: CUDA requested but not available; training on CPU")
        return "cpu"
    return name


def _distributed_worker(rank: int, devices: List[str], port: int, task: EnsamTrain, plan: dict):
    import torch
    import torch.distributed as dist

    from lib.training.distributed import init_process_group

    world_size = len(devices)
    device = devices[rank]
    if device == "cpu":  # the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    os.environ["MASTER_PORT"] = str(port)
    init_process_group(rank, world_size, device)  # MASTER_ADDR: loopback unless set
    try:
        task.run(plan, rank=rank, world_size=world_size, device=device)
    except Exception as e:
        if rank == 0:
            atomic_write_json(dict(plan["base_stats"], status="ERROR", error=f"{type(e).__name__}: {e}",
                                   total_time=_hms(time.time() - plan["start"])), task.stats_path)
        raise
    finally:
        dist.destroy_process_group()


def _cuda_available() -> bool:
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
