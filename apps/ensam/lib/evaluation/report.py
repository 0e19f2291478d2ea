"""The evaluator's summaries and reports: per-structure records -> means (:func:`summarize`, with how often a
corrective step made the answer worse, :func:`correction_drops`), and the results written as ``results.json``,
``results.md`` (:func:`results_markdown`) and ``dsc_vs_step.png`` (:func:`write_results`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np

__all__ = ["SUMMARY_KEYS", "HARM_DSC", "correction_drops", "summarize", "results_markdown", "plot_curves",
           "write_results"]

SUMMARY_KEYS = ("box_dsc", "box_nsd", "dsc_auc", "nsd_auc", "final_dsc", "final_nsd")
HARM_DSC = (0.05, 0.2)  # a corrective step that lowers the DSC by more than these is harmful / destructive (issue 27)


def correction_drops(structures: List[dict]) -> dict:
    """How often a corrective step made the answer worse, pooled over every corrective step that was taken (a
    step with no click, the answer being perfect, is not counted): ``harmful_steps`` (fraction lowering the DSC by
    more than 0.05), ``destructive_steps`` (more than 0.2), ``worst_drop`` (largest DSC loss of one step) and
    ``corrective_steps`` (how many)."""
    drops = []
    for s in structures:
        skipped = set(s.get("no_click") or [])
        d = s["dsc"]
        drops += [d[i - 1] - d[i] for i in range(1, len(d)) if i not in skipped]
    n = len(drops)
    return {"corrective_steps": n,
            "harmful_steps": float(sum(x > HARM_DSC[0] for x in drops) / n) if n else 0.0,
            "destructive_steps": float(sum(x > HARM_DSC[1] for x in drops) / n) if n else 0.0,
            "worst_drop": float(max([0.0] + drops))}


def summarize(structures: List[dict]) -> dict:
    """Mean over structures of the summary numbers and of the per-step curves."""
    if not structures:
        return {}
    out = {k: float(np.mean([s[k] for s in structures])) for k in SUMMARY_KEYS}
    out["dsc_curve"] = np.mean([s["dsc"] for s in structures], axis=0).tolist()
    out["nsd_curve"] = np.mean([s["nsd"] for s in structures], axis=0).tolist()
    times = [t for s in structures for t in s["seconds"] if t is not None]
    out["seconds_per_step"] = float(np.mean(times)) if times else 0.0
    mems = [s["peak_mb_max"] for s in structures if s.get("peak_mb_max") is not None]
    out["peak_mb"] = float(max(mems)) if mems else None
    out.update(correction_drops(structures))
    out["n_structures"] = len(structures)
    out["n_errors"] = int(sum(len(s["errors"]) for s in structures))
    out["n_over_budget"] = int(sum(bool(s["over_budget"]) for s in structures))
    return out


def _f(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"


def results_markdown(results: dict) -> str:
    methods = results["methods"]
    pr = results["protocol"]
    lines = ["# Interactive evaluation", "",
             f"Data: `{results['data']}`; seed {pr['seed']}; box (jitter 0..{pr['jitter_voxels']} voxels) then "
             f"{pr['clicks']} clicks; NSD at {pr['nsd_tolerance_mm']} mm "
             f"(0 when DSC <= {pr['nsd_min_dsc']}); AUC = trapezoid over the click steps (max "
             f"{results['protocol']['clicks'] - 1}). Mean over structures. Step 0 = the box; in the '(click "
             f"start)' rows it is one foreground click at the label's deepest voxel and no box is ever given." +
             (" In the '(strokes)' rows every correction is a stroke along the medial axis of the largest error "
              "instead of a click (its points as the ensam_scribbles task samples them)."
              if "strokes" in pr.get("corrections", ()) else ""), "",
             "| method | structures | step-0 DSC | DSC_AUC | NSD_AUC | final DSC | final NSD | s/step | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        o = m["overall"]
        if not o:
            continue
        lines.append(f"| {name} | {o['n_structures']} | {_f(o['box_dsc'])} | {_f(o['dsc_auc'])} | {_f(o['nsd_auc'])} | "
                     f"{_f(o['final_dsc'])} | {_f(o['final_nsd'])} | {_f(o['seconds_per_step'], 2)} | "
                     f"{_f(o['peak_mb'], 0)} |")
    # per image
    case_names = []
    for m in methods.values():
        for c in m["by_case"]:
            if c not in case_names:
                case_names.append(c)
    lines += ["", "## Per image", "", "| image | method | structures | step-0 DSC | DSC_AUC | NSD_AUC | final DSC | "
              "final NSD | s/step |", "|---|---|---|---|---|---|---|---|---|"]
    for c in case_names:
        for name, m in methods.items():
            o = m["by_case"].get(c)
            if not o:
                continue
            lines.append(f"| {c} | {name} | {o['n_structures']} | {_f(o['box_dsc'])} | {_f(o['dsc_auc'])} | "
                         f"{_f(o['nsd_auc'])} | {_f(o['final_dsc'])} | {_f(o['final_nsd'])} | "
                         f"{_f(o['seconds_per_step'], 2)} |")
    # per structure
    names = list(methods)
    rows = {}
    for name, m in methods.items():
        for s in m["structures"]:
            rows.setdefault((s["case"], s["label"], s["name"], s["voxels"]), {})[name] = s
    for title, key in (("step-0 DSC (box, or the first click)", "box_dsc"), ("DSC_AUC", "dsc_auc"),
                       ("final DSC", "final_dsc"),
                       ("final NSD", "final_nsd")):
        lines += ["", f"## Per structure: {title}", "",
                  "| image | id | structure | voxels | " + " | ".join(names) + " |",
                  "|---|---|---|---|" + "---|" * len(names)]
        for (c, lid, sname, vox), per in rows.items():
            lines.append(f"| {c} | {lid} | {sname} | {vox} | " +
                         " | ".join(_f(per[n][key]) if n in per else "-" for n in names) + " |")
    errs = [(n, s["case"], s["name"], e) for n, m in methods.items() for s in m["structures"] for e in s["errors"]]
    if errs:
        lines += ["", "## Errors", ""] + [f"- {n} / {c} / {s}: {e}" for n, c, s, e in errs[:50]]
    mach = results.get("machine", {})
    lines += ["", f"Machine: {mach.get('processor')} ({mach.get('cpu_count')} CPUs visible), OMP_NUM_THREADS="
              f"{mach.get('omp_num_threads')}, torch threads {mach.get('torch_threads', '-')}, CUDA "
              f"{mach.get('cuda', '-')}. Memory = {results['protocol']['memory']}.", ""]
    return "\n".join(lines)


def plot_curves(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = results["protocol"]["clicks"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results["methods"].items():
        o = m["overall"]
        if o:
            ax.plot(range(n + 1), o["dsc_curve"], marker="o", label=name)
    ax.set_xticks(range(n + 1))
    ax.set_xticklabels(["box / 1st click"] + [f"click {i}" for i in range(1, n + 1)], rotation=30)
    ax.set_ylabel("mean DSC over structures")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"DSC per interaction step ({Path(results['data']).name})")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def write_results(results: dict, out_dir) -> Dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``dsc_vs_step.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "dsc_vs_step.png"}
    paths["json"].write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    paths["md"].write_text(results_markdown(results))
    plot_curves(results, paths["png"])
    return paths


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))
