"""Data-parallel training (lib/training/distributed.py, finetune(rank=, world_size=)) with real torch.distributed
processes over the gloo backend on CPU: the same code path as several GPUs with NCCL, minus the device."""

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lib.local_server import free_port
from lib.network import NetworkConfig, build_network
from lib.training.distributed import average_gradients, broadcast_parameters, init_process_group
from lib.training.finetune import finetune
from lib.training.loop import LoopConfig

WORLD = 2
TINY = dict(filters=8, blocks=(1, 1, 1), depth=1, heads=2, num_labels=8, roi_size=(16, 16, 16))


def _setup(rank, port):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    init_process_group(rank, WORLD, "cpu")


def _toy_case(shift: int):
    rng = np.random.default_rng(shift)
    img = rng.normal(0, 20, (40, 36, 32)).astype(np.float32) - 1000
    img[4:36, 4:32, 4:28] += 1040
    lab = np.zeros(img.shape, np.int16)
    lab[10 + shift:22 + shift, 10:20, 8:18] = 1
    img[lab == 1] += 80
    return {"image": img, "label": lab, "affine": np.diag([1.5, 1.5, 2.5, 1.0])}


# ------------------------------------------------------------------------------------------------- workers
def _grad_worker(rank, port, out):
    _setup(rank, port)
    try:
        torch.manual_seed(rank)  # different initial weights on purpose: broadcast must fix them
        m = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(2, 1), "unused": nn.Linear(2, 2)})
        broadcast_parameters(m)
        init = {k: v.clone() for k, v in m.state_dict().items()}
        for p in m["a"].parameters():
            p.grad = torch.full_like(p, float(rank + 1))        # rank 0: 1, rank 1: 2 -> mean 1.5
        if rank == 1:
            for p in m["b"].parameters():
                p.grad = torch.full_like(p, 4.0)                 # only rank 1 -> mean 2.0 on both
        average_gradients(m.parameters(), WORLD)
        torch.save({"init": init, "grads": {n: (None if p.grad is None else p.grad.clone())
                                            for n, p in m.named_parameters()}}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _finetune_worker(rank, port, out, stop_rank_after):
    _setup(rank, port)
    try:
        torch.manual_seed(100 + rank)  # replicas start different; finetune broadcasts rank 0's weights
        net = build_network(NetworkConfig(**TINY))
        steps_seen = [0]

        def progress(p):
            steps_seen[0] = p["step"]

        def should_stop():  # one rank alone asks to stop: all must stop at the same step
            return stop_rank_after is not None and rank == 1 and steps_seen[0] >= stop_rank_after

        init = {k: v.clone() for k, v in net.state_dict().items()}  # rank 0's are the ones broadcast
        stats = finetune(net, [_toy_case(rank)], max_seconds=300, max_steps=4, seed=rank, rank=rank,
                         world_size=WORLD, val_cases=[_toy_case(5)], keep_best=False, progress=progress,
                         should_stop=should_stop,
                         loop=LoopConfig.on_grid((16, 16, 16), max_clicks=1))
        torch.save({"stats": stats, "state": net.state_dict(), "init0": init}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args):
    mp.spawn(fn, args=(free_port(),) + args, nprocs=WORLD, join=True)


# ------------------------------------------------------------------------------------------------- tests
def test_gradients_are_averaged_and_untouched_parameters_stay_none(tmp_path):
    _spawn(_grad_worker, str(tmp_path))
    r = [torch.load(tmp_path / f"{k}.pt", weights_only=True) for k in range(WORLD)]
    for k in r[0]["init"]:  # broadcast made rank 1's (different) initial weights equal to rank 0's
        assert torch.equal(r[0]["init"][k], r[1]["init"][k]), k
    for res in r:
        g = res["grads"]
        assert torch.allclose(g["a.weight"], torch.full((2, 3), 1.5))
        assert torch.allclose(g["a.bias"], torch.full((2,), 1.5))
        assert torch.allclose(g["b.weight"], torch.full((1, 2), 2.0))  # zeros from rank 0, 4 from rank 1
        assert g["unused.weight"] is None and g["unused.bias"] is None


def test_data_parallel_finetune_keeps_replicas_identical_and_trains(tmp_path):
    _spawn(_finetune_worker, str(tmp_path), None)
    r = [torch.load(tmp_path / f"{k}.pt", weights_only=False) for k in range(WORLD)]
    assert r[0]["stats"]["steps"] == r[1]["stats"]["steps"] == 4
    # rank 0 validated (before / after); the others did not
    assert "val_before" in r[0]["stats"] and "val_before" not in r[1]["stats"]
    assert not r[0]["stats"]["restored_best"]  # keep_best=False: the trained replicas are compared
    for k, v in r[0]["state"].items():
        assert torch.equal(v, r[1]["state"][k]), f"replicas diverged at {k}"
    changed = [k for k, v in r[0]["state"].items() if not torch.equal(v, r[0]["init0"][k])]
    assert len(changed) > len(r[0]["state"]) // 2, "the steps did not update the weights"


def test_one_rank_stopping_stops_every_rank_at_the_same_step(tmp_path):
    _spawn(_finetune_worker, str(tmp_path), 2)
    r = [torch.load(tmp_path / f"{k}.pt", weights_only=False) for k in range(WORLD)]
    assert r[0]["stats"]["steps"] == r[1]["stats"]["steps"] == 2
