"""The command line: ``python -m lib.experiments.labelling_loop`` (a run, or ``--from-json`` to re-summarise)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from .config import EVAL_STRUCTURES, FAMILIES, ORDERS, REPO, LoopConfig, family_config
from .loop import run_loop
from .summary import plot, summarize

DESCRIPTION = ("The labelling loop, simulated through the real server over HTTP: label instances of a family, "
               "fine-tune every few labels, measure clicks to DSC 0.90, prompt-free DSC and forgetting per round.")


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> dict:
    """Parse ``argv`` (default: the command line; ``prog``: the name the usage shows), run or re-summarise."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    p.add_argument("--family", default="vertebrae", help=f"a preset ({', '.join(FAMILIES)}) or any name with "
                                                         f"--pattern")
    p.add_argument("--label", default="", help="the label name saved (default: the preset's, else --family)")
    p.add_argument("--pattern", default="", help="regular expression of the instances' label names")
    p.add_argument("--modality", default=None, help="only scans of this modality (default: the preset's)")
    p.add_argument("--data", default=None, help="folder with dataset.json (default: the preset's, else the "
                                                "training sources)")
    p.add_argument("--eval-data", default=LoopConfig.eval_data)
    p.add_argument("--eval-structures", default=EVAL_STRUCTURES,
                   help="forgetting probe 'case:name,name;case:name' ('' = none)")
    p.add_argument("--instances", type=int, default=8, help="instances drawn (seeded) from the family (0 = all)")
    p.add_argument("--min-voxels", type=int, default=200)
    p.add_argument("--margin-mm", type=float, default=15.0, help="crop margin around an instance, per side")
    p.add_argument("--orders", default="first,random", help=f"comma list of {', '.join(ORDERS)}")
    p.add_argument("--every", type=int, default=3, help="labels per fine-tuning round")
    p.add_argument("--rounds", type=int, default=2, help="fine-tuning rounds at most")
    p.add_argument("--train-seconds", type=float, default=180.0, help="CPU time budget of one round")
    p.add_argument("--train-steps", type=int, default=0, help="step limit of one round (0 = none)")
    p.add_argument("--rehearsal", type=float, default=0.3)
    p.add_argument("--train-args", type=json.loads, default={},
                   help='more keys of every train request, JSON (e.g. \'{"start_from": "shipped"}\')')
    p.add_argument("--target", type=float, default=0.90)
    p.add_argument("--max-clicks", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of the server, the train task "
                                                          "and this process")
    p.add_argument("--no-uncertainty", action="store_true", help="skip the uncertainty scoring of every round")
    p.add_argument("--saving-after", type=int, default=5)
    p.add_argument("--work", default="", help="keep the servers' folders here (default: a temporary folder)")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "labelling_loop.json"))
    p.add_argument("--plots", default="", help="plot prefix (default: --out without .json); 'none' = no plots")
    p.add_argument("--deadline-minutes", type=float, default=0.0,
                   help="do not start an order that would end after this many minutes (0 = no deadline)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--from-json", default="", help="re-summarise and re-plot an existing result (no run)")
    a = p.parse_args(argv)
    if a.from_json:
        from lib.io.atomic import atomic_write_json

        with open(a.from_json) as f:
            result = json.load(f)
        c = result["config"]
        result["summary"] = summarize(result, LoopConfig(**dict(c, orders=tuple(c["orders"]))))
        if a.plots != "none":
            prefix = a.plots or os.path.splitext(a.from_json)[0]
            result["plots"] = [os.path.relpath(x, os.path.dirname(os.path.abspath(a.from_json)))
                               for x in plot(result, prefix)]
        atomic_write_json(result, a.from_json)
        print(json.dumps(result["summary"], indent=1))
        return result

    preset = family_config(a.family) if a.family in FAMILIES else {}
    if not preset and not a.pattern:
        p.error(f"--family {a.family!r} is not a preset ({', '.join(FAMILIES)}): give --pattern")
    orders = tuple(o.strip() for o in a.orders.split(",") if o.strip())
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    cfg = LoopConfig(family=a.family, label=a.label or preset.get("name") or a.family,
                     pattern=a.pattern or preset["pattern"],
                     modality=preset.get("modality", "") if a.modality is None else a.modality,
                     data=a.data or preset.get("data") or LoopConfig.data, eval_data=a.eval_data,
                     eval_structures=a.eval_structures, instances=a.instances,
                     min_voxels=a.min_voxels, margin_mm=a.margin_mm, orders=orders, every=a.every, rounds=a.rounds,
                     train_seconds=a.train_seconds, train_steps=a.train_steps, rehearsal=a.rehearsal,
                     train_args=dict(a.train_args),
                     target=a.target, max_clicks=a.max_clicks, seed=a.seed, threads=a.threads,
                     uncertainty=not a.no_uncertainty, saving_after=a.saving_after,
                     cases=tuple(preset.get("cases", ())) if a.data is None or (
                         "data" in preset and os.path.samefile(a.data, preset["data"])) else ())
    if a.work:
        os.makedirs(a.work, exist_ok=True)
    from lib.io.atomic import atomic_write_json

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)

    def write(result: dict) -> None:  # after every order: what is done so far survives an interruption
        if a.plots != "none":
            prefix = a.plots or os.path.splitext(a.out)[0]
            result["plots"] = [os.path.relpath(x, os.path.dirname(os.path.abspath(a.out)))
                               for x in plot(result, prefix)]
        atomic_write_json(result, a.out)

    result = run_loop(cfg, work=a.work or None, progress=not a.quiet, checkpoint=write,
                      deadline_minutes=a.deadline_minutes)
    write(result)
    print(json.dumps(result["summary"], indent=1))
    return result
