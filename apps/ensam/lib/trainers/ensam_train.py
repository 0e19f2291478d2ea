"""The ``ensam`` train task: fine-tune from the labels saved in the datastore (tag ``final``).

It subclasses monailabel's plain :class:`TrainTask` (no ignite, no MLflow: tracking is off, so a Slicer "Train"
click just works) and delegates the loop to ``lib.training.finetune`` (simulated boxes and clicks as the evaluator
does, interaction-unrolled). This module owns what is MONAI Label specific:

* the datalist: every image with a ``final`` label, its label names read from the label info that Slicer/OHIF
  save (``label_info: [{"name": .., "idx": ..}]``) or from the app's known names;
* a deterministic validation split (``val_split``);
* the label vocabulary: new names get new label tokens (``model/ensam_labels.json``);
* publication: the best weights go to ``model/ensam.pt`` by atomic rename, so the infer tasks (which watch the
  file's mtime) pick them up without a restart and never read half a file;
* statistics for ``/info`` (``train_stats``), updated while training runs;
* CPU or GPU; several GPUs through ``torch.distributed`` (one process per GPU) when ``multi_gpu`` is set and
  more than one GPU is visible.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import random
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.infers.label_vocab import canonical, extend_vocab, load_vocab, output_ids, read_meta, write_vocab_and_meta

logger = logging.getLogger(__name__)


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, (list, tuple)) and v else v


def _as_bool(v: Any) -> bool:
    v = _first(v)
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def atomic_save_state_dict(state_dict: dict, path: str) -> None:
    import torch

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ensam_", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        torch.save(state_dict, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(obj: Any, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".stats_", suffix=".tmp", dir=d)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


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
            "max_epochs": 20,
            "time_budget_s": 600,
            "steps_per_epoch": 0,
            "val_split": 0.2,
            "learning_rate": 1e-4,
            "labels": "",
            "pretrained": True,
            "early_stop_patience": 0,
            "seed": 0,
            "multi_gpu": False,
            "gpus": "all",
        }
        self._config.update(config or {})

    def config(self):
        return self._config

    def stats(self):
        if os.path.exists(self.stats_path):
            try:
                with open(self.stats_path) as f:
                    return json.load(f)
            except (OSError, ValueError):
                return {}
        return {}

    # ---- request -> plan ------------------------------------------------------------------------------------
    def parse_request(self, request: dict) -> dict:
        req = copy.deepcopy(self._config)
        req.update(copy.deepcopy(request or {}))
        out = dict(req)
        out["device"] = str(_first(req.get("device")) or "cpu")
        for k, cast in (("max_epochs", int), ("time_budget_s", float), ("steps_per_epoch", int),
                        ("val_split", float), ("learning_rate", float), ("seed", int),
                        ("early_stop_patience", int)):
            try:
                out[k] = cast(_first(req.get(k)))
            except (TypeError, ValueError):
                raise ValueError(f"train parameter {k!r} must be a number, got {req.get(k)!r}") from None
        if not 0.0 <= out["val_split"] < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {out['val_split']}")
        if out["max_epochs"] < 1:
            raise ValueError("max_epochs must be >= 1")
        labels = req.get("labels") or ""
        if isinstance(labels, str):
            labels = [s.strip() for s in labels.split(",") if s.strip()]
        out["labels"] = [str(s) for s in labels]
        out["pretrained"] = _as_bool(req.get("pretrained", True))
        out["multi_gpu"] = _as_bool(req.get("multi_gpu", False))
        out["gpus"] = str(_first(req.get("gpus")) or "all")
        return out

    def datalist(self, datastore: Datastore, wanted: Sequence[str]) -> List[dict]:
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
            "total_epochs": req["max_epochs"],
            "epoch": 0,
            "train_images": [it["id"] for it in train_items],
            "val_images": [it["id"] for it in val_items],
            "label_names": {n: vocab[n] for n in names},
            "status": "RUNNING",
        }
        atomic_write_json(base_stats, self.stats_path)

        world_size = self._world_size(req)
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
        if world_size > 1:
            import torch.multiprocessing as mp

            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(random.randint(20000, 29999)))
            logger.info(f"ensam train: torch.distributed over {world_size} GPUs")
            mp.spawn(_distributed_worker, nprocs=world_size, args=(world_size, self, plan), join=True)
            stats = self.stats()
        else:
            stats = self.run(plan, rank=0, world_size=1)
        return stats

    def run(self, plan: dict, rank: int = 0, world_size: int = 1) -> dict:
        req = plan["request"]
        base_stats = plan["base_stats"]
        start = plan["start"]
        best = {"metric": None, "epoch": 0}
        publish_path = self.publish_path

        def on_epoch(epoch: int, metrics: dict):
            """Progress for /info (rank 0 only)."""
            if rank != 0:
                return
            s = dict(base_stats)
            s.update({"epoch": int(epoch), "current_time": _hms(time.time() - start), "metrics": metrics})
            if best["metric"] is not None:
                s.update({"best_metric": best["metric"], "best_metric_epoch": best["epoch"]})
            atomic_write_json(s, self.stats_path)

        def publish(state_dict: dict, metric: float, epoch: int):
            """Best weights so far -> model/ensam.pt (atomic) with the vocabulary next to it."""
            if rank != 0:
                return
            best["metric"], best["epoch"] = float(metric), int(epoch)
            meta = {"network": plan["network_config"], "trained_from": os.path.basename(plan["init_weights"] or ""),
                    "epoch": int(epoch), "val_metric": float(metric), "labels_trained": plan["label_names"]}
            write_vocab_and_meta(publish_path, plan["vocab"], {k: v for k, v in meta.items() if v or v == 0})
            atomic_save_state_dict(state_dict, publish_path)
            logger.info(f"ensam train: published {publish_path} (epoch {epoch}, val metric {metric:.4f})")

        from lib.training import finetune  # the training library (plain PyTorch)

        device = req["device"]
        if world_size > 1:
            device = f"cuda:{rank}"
        result = _call_finetune(
            finetune,
            train_items=plan["train_items"],
            val_items=plan["val_items"],
            vocab=plan["vocab"],
            init_weights=plan["init_weights"],
            network_config=plan["network_config"],
            device=device,
            max_epochs=req["max_epochs"],
            time_budget_s=req["time_budget_s"],
            steps_per_epoch=req["steps_per_epoch"] or None,
            learning_rate=req["learning_rate"],
            early_stop_patience=req["early_stop_patience"],
            seed=req["seed"],
            rank=rank,
            world_size=world_size,
            on_epoch=on_epoch,
            publish=publish,
        )
        result = result if isinstance(result, dict) else {}
        if rank != 0:
            return result
        stats = dict(base_stats)
        stats.update({k: v for k, v in result.items() if _jsonable(v)})
        stats.update(
            {
                "status": "DONE",
                "epoch": int(result.get("epoch", result.get("epochs", base_stats["total_epochs"]))),
                "total_time": _hms(time.time() - start),
                "total_seconds": round(time.time() - start, 1),
                "weights": os.path.basename(publish_path) if os.path.exists(publish_path) else None,
            }
        )
        if best["metric"] is not None:
            stats.update({"best_metric": best["metric"], "best_metric_epoch": best["epoch"]})
        atomic_write_json(stats, self.stats_path)
        return stats

    def _vocab(self) -> Dict[str, int]:
        return load_vocab(self.weight_paths, self.extra_names, self.num_labels)

    def _init_weights(self) -> Optional[str]:
        existing = [p for p in self.weight_paths if os.path.exists(p)]
        return existing[-1] if existing else None

    @staticmethod
    def _world_size(req: dict) -> int:
        if not req["multi_gpu"] or not _cuda_available():
            return 1
        import torch

        gpus = req["gpus"]
        n = torch.cuda.device_count() if gpus in ("", "all") else len([g for g in gpus.split(",") if g.strip()])
        return n if n > 1 else 1


def _distributed_worker(rank: int, world_size: int, task: EnsamTrain, plan: dict):
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method="env://", world_size=world_size, rank=rank)
    try:
        task.run(plan, rank=rank, world_size=world_size)
    finally:
        dist.destroy_process_group()


def _call_finetune(fn: Callable, **kwargs):
    """Pass only the arguments the training library's ``finetune`` accepts."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


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
