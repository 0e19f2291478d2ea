"""CLI of the interactive evaluator.

    cd /work/main && PYTHONPATH=apps/ensam .venv/bin/python -m lib.evaluation --data sample-datasets/eval \
        --out eval-results [--methods ensam,graphcut,random_walker,region_growing,box_fill] [--max-structures N]
        [--start box,click] [--corrections clicks,strokes]

Writes ``results.json``, ``results.md`` and ``dsc_vs_step.png`` into ``--out``. ``--tune`` instead grid-searches
the baselines' parameters on a TRAINING set (see ``lib.evaluation.baselines.tune``) and writes ``tuning.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_METHODS = "ensam,graphcut,random_walker,region_growing,box_fill"


def _set_threads(n: int, torch_needed: bool) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    except Exception:
        pass
    if "torch" in sys.modules or torch_needed:  # importing torch costs seconds: only when a method needs it
        try:
            import torch

            torch.set_num_threads(n)
        except Exception:
            pass


def build_methods(names, weights=None, device="cpu", log=print, engine_config=None):
    from .baselines import BASELINES, make_baseline
    from .evaluator import EnsamMethod, default_ensam_weights

    methods = []
    for name in names:
        if name == "ensam":
            w = weights or default_ensam_weights()
            if w is None:
                log("ensam: skipped (no weights: apps/ensam/model/ensam.pt or pretrained_ensam.pt; "
                    "give --ensam-weights)")
                continue
            try:
                methods.append(EnsamMethod(weights=w, device=device, config=engine_config))
                log(f"ensam: weights {w} on {device}")
            except Exception as e:  # engine missing or weights unusable: evaluate the rest
                log(f"ensam: skipped ({type(e).__name__}: {e})")
        elif name in BASELINES:
            methods.append(make_baseline(name))
        else:
            raise SystemExit(f"unknown method {name!r}; choose from ensam, {', '.join(sorted(BASELINES))}")
    return methods


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.evaluation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default=None, choices=["tune", "tune-hippocampus", "eval"],
                    help="a named split (lib.evaluation.splits): 'tune' (training sources: where settings are "
                         "decided), 'tune-hippocampus' (12 subjects of the hippocampus set, 3 structures each) or "
                         "'eval' (reported only); sets --data, --cases and --max-structures")
    ap.add_argument("--data", default="sample-datasets/eval", help="folder with dataset.json (default: %(default)s)")
    ap.add_argument("--out", default="eval-results", help="output folder (default: %(default)s)")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated (default: %(default)s)")
    ap.add_argument("--max-structures", type=int, default=None, help="at most N structures per image (lowest ids)")
    ap.add_argument("--cases", default=None, help="comma-separated substrings of image names to keep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--start", default="box",
                    help="start protocols, comma-separated: box (step 0 = box) and/or click (step 0 = one foreground "
                         "click at the label's deepest voxel, no box) (default: %(default)s)")
    ap.add_argument("--corrections", default="clicks",
                    help="kinds of corrective step, comma-separated: clicks (deepest voxel of the largest error) "
                         "and/or strokes (a stroke along that error's medial axis, issue 12; rows named "
                         "'<method> (strokes)') (default: %(default)s)")
    ap.add_argument("--jitter", type=int, default=3, help="box jitter in voxels (outward, 0..N)")
    ap.add_argument("--ensam-weights", default=None, help="weights for the ensam method (default: model folder)")
    ap.add_argument("--engine", default=None, metavar="JSON",
                    help='EngineConfig settings of the ensam method, e.g. \'{"tta_flips": [[0]]}\' (default: none)')
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch/SimpleITK (default: 1)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--tune", action="store_true", help="grid-search the baselines on --data (a training set!)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.split:
        from .splits import SPLITS, split_cases

        split = SPLITS[args.split]
        args.data = split.data
        kept = split_cases(args.split)
        args.cases = ",".join(kept) if kept else args.cases
        args.max_structures = split.max_structures or args.max_structures
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    _set_threads(args.threads, torch_needed="ensam" in names and not args.tune)
    cases = [c.strip() for c in args.cases.split(",")] if args.cases else None
    if args.tune:
        from .baselines import tune

        if "eval" in Path(args.data).resolve().name:
            print("refusing to tune on an evaluation set; use the training set", file=sys.stderr)
            return 2
        report = tune(args.data, [n for n in names if n not in ("ensam", "box_fill")],
                      cases=cases or ["ct_small"], max_structures=args.max_structures, seed=args.seed)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tuning.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out / 'tuning.json'}")
        return 0

    from .evaluator import evaluate, write_results

    engine_config = None
    if args.engine:
        from ..engine import EngineConfig

        try:
            engine_config = EngineConfig(**json.loads(args.engine))
        except (ValueError, TypeError) as e:
            print(f"--engine: {e}", file=sys.stderr)
            return 2
    methods = build_methods(names, args.ensam_weights, args.device, engine_config=engine_config)
    if not methods:
        print("no method to evaluate", file=sys.stderr)
        return 2
    results = evaluate(methods, args.data, seed=args.seed, n_clicks=args.clicks, jitter=args.jitter,
                       max_structures=args.max_structures, cases=cases, progress=not args.no_progress,
                       starts=[x.strip() for x in args.start.split(",") if x.strip()],
                       corrections=[x.strip() for x in args.corrections.split(",") if x.strip()])
    results["command"] = " ".join([os.path.basename(sys.executable), "-m", "lib.evaluation"] +
                                  list(argv if argv is not None else sys.argv[1:]))
    paths = write_results(results, args.out)
    print(Path(paths["md"]).read_text().split("\n## ")[0])
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
