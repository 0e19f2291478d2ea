"""Issue 14: parameters and image-encoding time of the SegResNet and xLSTM encoders (lib/network).

Usage (from the repository root)::

    PYTHONPATH=apps/ensam .venv/bin/python scripts/bench_encoder.py [--size 64] [--threads 2,1] [--repeats 5]
        [--device cpu] [--json out.json]

For each thread count and encoder: the whole network's and the encoder's parameters, then ``net.encode`` of one
random (1, 1, S, S, S) image (what the engine runs once per ROI; the encoding is cached across clicks): the median
and minimum of ``--repeats`` timed passes after one warm-up, under ``torch.no_grad``, fp32, plus one forward +
backward of the encoder (what a training step pays). Prints a Markdown table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from lib.network import NetworkConfig, build_network


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(encoder: str, size: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    net = build_network(NetworkConfig(encoder=encoder)).to(device).eval()
    x = torch.randn(1, 1, size, size, size, device=device)
    with torch.no_grad():
        net.encode(x)  # warm-up
        times = [_timed(lambda: net.encode(x), device) for _ in range(repeats)]

    def train_pass():
        sum(f.float().square().mean() for f in net.encode(x)).backward()

    net.train()
    train_pass()  # warm-up
    train = _timed(train_pass, device)
    return {"encoder": encoder, "params": sum(p.numel() for p in net.parameters()),
            "encoder_params": sum(p.numel() for p in net.encoder.parameters()),
            "encode_ms_median": 1000 * statistics.median(times), "encode_ms_min": 1000 * min(times),
            "train_pass_ms": 1000 * train}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", default="2,1", help="comma-separated CPU thread counts")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--encoders", default="segresnet,xlstm")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    rows = []
    print(f"{os.cpu_count()} CPUs visible, torch {torch.__version__}, device {a.device}, {a.size}^3, fp32", flush=True)
    print("| encoder | threads | parameters (network / encoder) | encode ms (median, min) | encoder fwd+bwd ms |")
    print("|---|---|---|---|---|")
    for threads in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(threads)
        for enc in a.encoders.split(","):
            r = {**measure(enc, a.size, a.repeats, a.device), "threads": threads, "size": a.size}
            rows.append(r)
            print(f"| {enc} | {threads} | {r['params'] / 1e6:.2f} M / {r['encoder_params'] / 1e6:.2f} M | "
                  f"{r['encode_ms_median']:.0f}, {r['encode_ms_min']:.0f} | {r['train_pass_ms']:.0f} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
