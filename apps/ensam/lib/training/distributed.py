"""Data-parallel training over several processes with ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

The training step calls ``net.encode`` / ``net.decode`` rather than ``forward``, so ``DistributedDataParallel``'s
forward hooks do not apply; instead every rank runs the same step on its own sample and :func:`average_gradients`
all-reduces the gradients (one flat buffer) before the optimiser step. With identical initial weights
(:func:`broadcast_parameters`), identical averaged gradients and a deterministic optimiser, the replicas stay
bit-identical, so rank 0 alone can validate and publish.

Every collective here must be called by every rank in the same order; :class:`Sync` bundles the per-step
agreement (stop / learning-rate progress) so the loop cannot drift.

Two ways to start the ranks, one training code:

* one machine: :class:`lib.training.finetune_job.FinetuneJob` spawns one process per device itself and calls
  :func:`init_process_group` (rendezvous on loopback unless ``MASTER_ADDR`` says otherwise);
* several machines: ``torchrun --nnodes N --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT ...`` starts
  the ranks and sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (and the store's address); :func:`launch_env`
  reads them and :func:`init_from_launcher` joins that group (docs/SCALE_OUT.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["Sync", "broadcast_parameters", "average_gradients", "backend_for", "init_process_group", "LaunchEnv",
           "launch_env", "rank_device", "init_from_launcher"]

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun (torch.distributed.elastic) sets in every worker


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process stands in a group started by ``torchrun``: global rank, world size, rank on this machine,
    processes on this machine."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def launch_env(environ=None) -> Optional[LaunchEnv]:
    """The ``torchrun`` environment of this process, or None when it was not started by a launcher (all of
    :data:`LAUNCH_VARS` are needed; a partial or malformed set is an error, not a silent single process)."""
    environ = os.environ if environ is None else environ
    present = [k for k in LAUNCH_VARS if k in environ]
    if not present:
        return None
    if len(present) != len(LAUNCH_VARS):
        missing = [k for k in LAUNCH_VARS if k not in environ]
        raise RuntimeError(f"incomplete launcher environment: {present} set but {missing} missing")
    try:
        rank, world, local = (int(environ[k]) for k in LAUNCH_VARS)
        local_world = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        raise RuntimeError(f"launcher environment is not numeric: "
                           f"{ {k: environ.get(k) for k in LAUNCH_VARS + ('LOCAL_WORLD_SIZE',)} }") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local < max(local_world, 1)):
        raise RuntimeError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world} "
                           f"LOCAL_RANK={local} LOCAL_WORLD_SIZE={local_world}")
    return LaunchEnv(rank, world, local, local_world)


def rank_device(requested: str, local_rank: int) -> str:
    """The device of a launched rank: its own GPU (``cuda:<LOCAL_RANK>``) when CUDA is asked for and present, else
    the CPU. One process per GPU: ``torchrun --nproc-per-node`` = the GPUs of a machine."""
    if str(requested).startswith("cuda") and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {n} GPU(s) visible on this machine: start at most "
                               f"{n} processes per node (torchrun --nproc-per-node)")
        return f"cuda:{local_rank}"
    return "cpu"


def init_from_launcher(requested_device: str = "cpu", timeout_s: float = 1800.0) -> Tuple[LaunchEnv, str]:
    """Join the process group a launcher (``torchrun``) set up: NCCL for GPU ranks, gloo on CPU; the rendezvous
    address and port come from the launcher (``env://``), never a loopback default. Returns (launch env, this
    rank's device)."""
    import datetime

    env = launch_env()
    if env is None:
        raise RuntimeError("not started by torchrun: RANK / WORLD_SIZE / LOCAL_RANK are not set")
    device = rank_device(requested_device, env.local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(device.split(":")[1]))
    dist.init_process_group(backend_for(device), init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return env, device


def init_process_group(rank: int, world_size: int, device: str) -> None:
    """``env://`` rendezvous of the processes one machine spawned (MASTER_PORT set by the spawner; MASTER_ADDR
    loopback unless set). Ranks started by ``torchrun`` use :func:`init_from_launcher` instead."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(str(device).split(":")[1]) if ":" in str(device) else rank)
    dist.init_process_group(backend_for(device), init_method="env://", world_size=world_size, rank=rank)


def _comm_device() -> torch.device:
    """Where collective buffers live: NCCL needs this rank's CUDA device, gloo takes CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank."""
    for t in list(module.parameters()) + list(module.buffers()):
        buf = t.data.to(_comm_device())
        dist.broadcast(buf, src)
        if buf.data_ptr() != t.data.data_ptr():
            t.data.copy_(buf)


@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Replace every gradient by its mean over the ranks (one all-reduce of a flat buffer).

    A parameter no rank touched this step (e.g. an unused label token) keeps ``grad = None`` so the optimiser
    skips it exactly as in single-process training; one that only some ranks touched gets zeros from the others.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    dev = _comm_device()
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().to(dev)
                      for p in params])
    dist.all_reduce(used)
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, u in zip(params, used.tolist()):
        n = p.numel()
        if u > 0:
            g = flat[offset:offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n


@dataclass
class Sync:
    """The per-step agreement between ranks: one all-reduce (MAX) of (stop?, progress fraction), so every rank
    stops at the same step and uses the same learning rate even though their clocks differ slightly."""

    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def agree(self, stop: bool, progress: float) -> Tuple[bool, float]:
        if not self.active:
            return stop, progress
        t = torch.tensor([1.0 if stop else 0.0, float(progress)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0].item() > 0), float(t[1].item())
