"""Speed and memory benchmark (a script, not a test): ``python -m lib.benchmark`` (``make bench``).

On a CT-sized int16 volume (default 512x512x300, 0.8x0.8x1.5 mm) with a synthetic organ: the first
interaction (box; includes the encoding), then refinement clicks (p50/p95 over --clicks), peak RSS; the same
ROI through MONAI's VISTA3D (``vista3d132``, random weights, one point prompt) at its 128^3 patch and at our
model grid; peak RSS while segmenting in a 512x512x600 volume; the same on CUDA when available. Each part runs
in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model", "pretrained_ensam.pt")


def _volume(depth: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (512, 512, depth)
    img = np.empty(shape, np.int16)
    for k in range(depth):  # slice by slice: no float64 copy of the whole volume
        img[:, :, k] = rng.normal(40, 30, shape[:2]).astype(np.int16)
    c = np.array([260, 230, depth // 2])
    r = np.array([70, 55, max(8, depth // 6)])
    sl = tuple(slice(ci - ri, ci + ri + 1) for ci, ri in zip(c, r))
    grid = np.ogrid[sl]
    inside = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1
    img[sl][inside] += 120
    box = [c[0] - r[0], c[0] + r[0], c[1] - r[1], c[1] + r[1], c[2] - r[2], c[2] + r[2]]
    return img, np.diag([0.8, 0.8, 1.5, 1.0]), [int(b) for b in box], c, r


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def part_ensam(args) -> dict:
    import torch

    from .engine import EnsamEngine

    torch.set_num_threads(args.threads)
    img, aff, box, c, r = _volume(args.depth)
    rss_data = _rss_mb()
    weights = args.weights if os.path.exists(args.weights) else None
    eng = EnsamEngine(weights=weights, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    eng.segment(img, aff, boxes=[[b + 3 for b in box]], image_key="warmup")  # one-off start-up costs
    eng.cache.clear()
    sync()
    t = time.perf_counter()
    mask = eng.segment(img, aff, boxes=[box])
    sync()
    first = time.perf_counter() - t
    info_first = dict(eng.last_info)
    rng = np.random.default_rng(1)
    times, hits = [], 0
    for _ in range(args.clicks):
        p = (c + rng.uniform(-0.6, 0.6, 3) * r).round().astype(int)
        h0 = eng.cache.hits
        sync()
        t = time.perf_counter()
        mask = eng.segment(img, aff, boxes=[box], points=[p.tolist()], point_labels=[1], prev_mask=mask)
        sync()
        times.append(time.perf_counter() - t)
        hits += eng.cache.hits > h0
    import torch as _t
    return {"part": "ensam", "device": args.device, "threads": args.threads, "shape": list(img.shape),
            "first_s": first, "refine_p50_s": float(np.percentile(times, 50)),
            "refine_p95_s": float(np.percentile(times, 95)), "clicks": len(times), "cache_hit_clicks": hits,
            "roi_size": info_first.get("roi_size"), "model_grid": list(eng.network.config.roi_size),
            "params": sum(p.numel() for p in eng.network.parameters()), "weights": weights or "random",
            "rss_volume_mb": rss_data, "peak_rss_mb": _rss_mb(),
            "gpu_peak_mb": (_t.cuda.max_memory_allocated() / 2 ** 20) if args.device.startswith("cuda") else None}


def part_vista(args) -> dict:
    import torch
    from monai.networks.nets import vista3d132

    torch.set_num_threads(args.threads)
    net = vista3d132(encoder_embed_dim=48, in_channels=1).to(args.device).eval()
    n = args.size
    x = torch.randn(1, 1, n, n, n, device=args.device)
    pts = torch.tensor([[[n // 2, n // 2, n // 2]]], device=args.device)
    lab = torch.tensor([[1]], device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            sync()
            t = time.perf_counter()
            net(x, point_coords=pts, point_labels=lab)
            sync()
            times.append(time.perf_counter() - t)
    return {"part": "vista3d", "device": args.device, "threads": args.threads, "size": n,
            "params": sum(p.numel() for p in net.parameters()), "forward_s": float(np.median(times)),
            "peak_rss_mb": _rss_mb()}


def _run_part(argv: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(argv[argv.index("--threads") + 1]))
    out = subprocess.run([sys.executable, "-m", "lib.benchmark", *argv], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["ensam", "vista3d"], help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--depth", type=int, default=300)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", default=WEIGHTS)
    ap.add_argument("--skip-vista", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.part == "ensam":
        print(json.dumps(part_ensam(args)))
        return
    if args.part == "vista3d":
        print(json.dumps(part_vista(args)))
        return

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for dev in devices:
        th = str(args.threads)
        common = ["--threads", th, "--device", dev, "--weights", args.weights]
        results.append(_run_part(["--part", "ensam", "--depth", str(args.depth), "--clicks", str(args.clicks), *common]))
        results.append(_run_part(["--part", "ensam", "--depth", "600", "--clicks", "5", *common]))
        if not args.skip_vista:
            grid = str(results[0]["model_grid"][0])
            for size in ("128", grid):
                results.append(_run_part(["--part", "vista3d", "--size", size, "--repeats", "1" if dev == "cpu" else "5",
                                          "--threads", th, "--device", dev]))
    print(f"\nENSAM benchmark ({args.threads} CPU threads; torch {torch.__version__})")
    print("| device | volume | first interaction (s) | refine p50 (s) | refine p95 (s) | clicks (cache hits) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["part"] == "ensam":
            print(f"| {r['device']} | {'x'.join(map(str, r['shape']))} int16 | {r['first_s']:.3f} | {r['refine_p50_s']:.3f} | "
                  f"{r['refine_p95_s']:.3f} | {r['clicks']} ({r['cache_hit_clicks']}) | {r['peak_rss_mb']:.0f} |")
    ens = {r["device"]: r for r in results if r["part"] == "ensam" and r["shape"][2] == args.depth}
    for r in results:
        if r["part"] == "vista3d":
            e = ens[r["device"]]
            print(f"VISTA3D ({r['params'] / 1e6:.0f}M params) {r['size']}^3 one point on {r['device']}: {r['forward_s']:.2f} s "
                  f"-> {r['forward_s'] / e['first_s']:.1f}x our first interaction, "
                  f"{r['forward_s'] / e['refine_p50_s']:.1f}x our refinement click "
                  f"(ENSAM {e['params'] / 1e6:.2f}M params, {e['model_grid'][0]}^3 grid)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
