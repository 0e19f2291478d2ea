"""Two evaluator runs of the same protocol and data, structure by structure: a release candidate against the release.

    PYTHONPATH=apps/ensam python -m lib.evaluation.compare runs/eval/r6/results.json runs/eval/cand/results.json \\
        [--method "ensam (click start)"] [--json out.json]

For each summary average (first-step DSC, DSC_AUC, NSD_AUC, final DSC, final NSD): both means, the difference, the
structures that went up / down, and the two-sided Wilcoxon signed-rank p over the paired structures (scipy); the
first-step DSC by structure size (thirds by voxel count, the same cut for both runs); and the corrective steps that
lowered the DSC (> 0.05 harmful, > 0.2 destructive, the worst drop). Structures are paired by (image, label); a
structure missing from either run is an error (the runs must cover the same structures).
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional

import numpy as np
from scipy import stats

__all__ = ["structures_of", "paired", "by_size", "compare", "main"]

KEYS = ("box_dsc", "dsc_auc", "nsd_auc", "final_dsc", "final_nsd")
DROP_KEYS = ("harmful_steps", "destructive_steps", "worst_drop")


def structures_of(results: dict, method: Optional[str]) -> tuple:
    methods = results["methods"]
    if method is None:
        if len(methods) != 1:
            raise SystemExit(f"several methods in the run ({sorted(methods)}): name one with --method")
        method = next(iter(methods))
    if method not in methods:
        raise SystemExit(f"method {method!r} not in the run ({sorted(methods)})")
    recs = {(s["case"], int(s["label"])): s for s in methods[method]["structures"]}
    return method, recs, methods[method]["overall"]


def paired(a: Dict[tuple, dict], b: Dict[tuple, dict], key: str) -> dict:
    """Means, difference, ups / downs and the Wilcoxon p of ``key`` over the structures both runs have."""
    if set(a) != set(b):
        raise ValueError(f"the runs cover different structures ({len(set(a) ^ set(b))} differ)")
    ids = sorted(a)
    x = np.array([a[i][key] for i in ids], float)
    y = np.array([b[i][key] for i in ids], float)
    d = y - x
    p = float(stats.wilcoxon(x, y).pvalue) if np.any(d != 0) else 1.0
    return {"a": float(x.mean()), "b": float(y.mean()), "diff": float(d.mean()), "up": int((d > 0).sum()),
            "down": int((d < 0).sum()), "p": p, "n": len(ids)}


def by_size(a: Dict[tuple, dict], b: Dict[tuple, dict], key: str = "box_dsc") -> dict:
    """``key`` by structure size: thirds by voxel count (cut on run ``a``'s structures), each run's mean."""
    ids = sorted(a, key=lambda i: a[i]["voxels"])
    thirds = np.array_split(np.arange(len(ids)), 3)
    out = {}
    for name, part in zip(("small", "medium", "large"), thirds):
        sel = [ids[j] for j in part]
        if not sel:  # fewer than three structures
            continue
        out[name] = {"a": float(np.mean([a[i][key] for i in sel])), "b": float(np.mean([b[i][key] for i in sel])),
                     "n": len(sel), "voxels": [int(a[sel[0]]["voxels"]), int(a[sel[-1]]["voxels"])]}
    return out


def largest_losses(a: Dict[tuple, dict], b: Dict[tuple, dict], key: str = "dsc_auc", n: int = 3) -> list:
    """The ``n`` structures whose ``key`` falls most from run ``a`` to run ``b`` (only falls): what an average
    hides (recipe v17's step 1320: the tuning split's click-start DSC_AUC -0.047 on average, -1.0 to -1.2 on each
    lung lobe)."""
    ids = sorted(a, key=lambda i: b[i][key] - a[i][key])[:n]
    return [{"case": i[0], "label": i[1], "name": a[i].get("name", str(i[1])), "voxels": int(a[i]["voxels"]),
             "a": float(a[i][key]), "b": float(b[i][key])} for i in ids if b[i][key] < a[i][key]]


def compare(run_a: dict, run_b: dict, method: Optional[str] = None, method_b: Optional[str] = None) -> dict:
    name_a, a, over_a = structures_of(run_a, method)
    name_b, b, over_b = structures_of(run_b, method_b or method)
    return {"methods": [name_a, name_b], "averages": {k: paired(a, b, k) for k in KEYS},
            "first_step_by_size": by_size(a, b), "dsc_auc_by_size": by_size(a, b, "dsc_auc"),
            "largest_dsc_auc_losses": largest_losses(a, b),
            "corrections": {k: {"a": over_a.get(k), "b": over_b.get(k)} for k in DROP_KEYS}}


def _markdown(res: dict) -> str:
    lines = [f"A = {res['methods'][0]}, B = {res['methods'][1]}", "",
             "| average | A | B | B - A | up / down | Wilcoxon p |", "|---|---|---|---|---|---|"]
    for k, r in res["averages"].items():
        lines.append(f"| {k} | {r['a']:.3f} | {r['b']:.3f} | {r['diff']:+.3f} | {r['up']} / {r['down']} | "
                     f"{r['p']:.3g} |")
    s = res["first_step_by_size"]
    lines.append("")
    lines.append("first step by size: " + ", ".join(f"{n} {v['a']:.3f} -> {v['b']:.3f} (n {v['n']})"
                                                     for n, v in s.items()))
    lines.append("DSC_AUC by size: " + ", ".join(f"{n} {v['a']:.3f} -> {v['b']:.3f} (n {v['n']})"
                                                  for n, v in res["dsc_auc_by_size"].items()))
    lines.append("largest DSC_AUC losses: " + (", ".join(f"{x['case']}/{x['name']} ({x['voxels']} voxels) "
                                                         f"{x['a']:.3f} -> {x['b']:.3f}"
                                                         for x in res["largest_dsc_auc_losses"]) or "none"))
    c = res["corrections"]
    lines.append("corrections: " + ", ".join(f"{k} {v['a']} -> {v['b']}" for k, v in c.items()))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="results.json of the reference run (the release)")
    ap.add_argument("b", help="results.json of the candidate")
    ap.add_argument("--method", default=None, help="method row (default: the run's only one)")
    ap.add_argument("--method-b", default=None, help="the candidate's row when it is named otherwise")
    ap.add_argument("--json", default=None, help="also write the comparison here")
    a = ap.parse_args(argv)
    res = compare(json.load(open(a.a)), json.load(open(a.b)), a.method, a.method_b)
    print(_markdown(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
