"""Data-parallel training over several processes with ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

The training step calls ``net.encode`` / ``net.decode`` rather than ``forward``, so ``DistributedDataParallel``'s
forward hooks do not apply; instead every rank runs the same step on its own sample and :func:`average_gradients`
all-reduces the gradients (one flat buffer) before the optimiser step. With identical initial weights
(:func:`broadcast_parameters`), identical averaged gradients and a deterministic optimiser, the replicas stay
bit-identical, so rank 0 alone can validate and publish.

Every collective here must be called by every rank in the same order; :class:`Sync` bundles the per-step
agreement (stop / learning-rate progress) so the loop cannot drift.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Tuple

import torch
import torch.distributed as dist

__all__ = ["Sync", "broadcast_parameters", "average_gradients", "backend_for", "init_process_group"]


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def init_process_group(rank: int, world_size: int, device: str) -> None:
    """``env://`` rendezvous (MASTER_ADDR / MASTER_PORT set by the launcher)."""
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
