"""One data-parallel training step in a rank started by ``torchrun`` (tests/test_torchrun.py starts two "nodes" on
127.0.0.1). Not a test module: it is the script every rank runs, and the test imports its helpers to compute the
same step in one process on the combined batch.

    torchrun --nnodes 2 --node_rank R --nproc-per-node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT \
        tests/torchrun_step_worker.py OUT_DIR
"""

import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "apps", "ensam"))

from lib.network import NetworkConfig, build_network  # noqa: E402
from lib.training.finetune import _draw_case, _sampler, as_volumes  # noqa: E402
from lib.training.loop import LoopConfig, train_step  # noqa: E402
from lib.training.optim import build_optimizer  # noqa: E402

TINY = dict(filters=8, blocks=(1, 1, 1), depth=1, heads=2, num_labels=8, roi_size=(16, 16, 16))
LR = 1e-2
OPTIMIZER = "adamw"


def loop_config() -> LoopConfig:
    return LoopConfig.on_grid((16, 16, 16), max_clicks=2)


def make_net(seed: int):
    torch.manual_seed(seed)
    return build_network(NetworkConfig(**TINY))


def toy_volume(shift: int) -> dict:
    rng = np.random.default_rng(shift)
    img = rng.normal(0, 20, (40, 36, 32)).astype(np.float32) - 1000
    img[4:36, 4:32, 4:28] += 1040
    lab = np.zeros(img.shape, np.int16)
    lab[8 + 2 * shift:22 + 2 * shift, 10:20, 8:18] = 1
    img[lab == 1] += 80
    return {"image": img, "label": lab, "affine": np.diag([1.5, 1.5, 2.5, 1.0])}


def rank_sample(rank: int):
    """Rank ``rank``'s training case and the generator its step goes on with (finetune's own sampler)."""
    rng = np.random.default_rng(rank)
    sampler = _sampler(as_volumes([toy_volume(rank)], None, rank), None, 0.0)
    return _draw_case(sampler, rng, loop_config(), False), rng


def main(out_dir: str) -> None:
    from lib.training.distributed import average_gradients, broadcast_parameters, init_from_launcher
    import torch.distributed as dist

    torch.set_num_threads(1)
    env, device = init_from_launcher("cpu")
    try:
        assert dist.get_backend() == "gloo" and env.world_size == 2, (dist.get_backend(), env)
        net = make_net(100 + env.rank)  # different on purpose: rank 0's weights are broadcast
        broadcast_parameters(net)
        init = {k: v.clone() for k, v in net.state_dict().items()}
        opt = build_optimizer(net, OPTIMIZER, lr=LR)
        case, rng = rank_sample(env.rank)
        loss, _ = train_step(net, opt, case, rng, loop_config(), device, False,
                             grad_hook=lambda n: average_gradients(n.parameters(), env.world_size))
        torch.save({"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank, "loss": loss,
                    "init": init, "state": net.state_dict(), "backend": dist.get_backend()},
                   os.path.join(out_dir, f"rank{env.rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
