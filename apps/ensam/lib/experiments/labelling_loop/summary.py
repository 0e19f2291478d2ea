"""A result's summary per order (the issue's targets, met or not) and its two plots."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np

from .config import REPO, LoopConfig


def summarize(result: dict, cfg: LoopConfig) -> dict:
    """Per order: the click saving after ``cfg.saving_after`` labels (pooled: 1 - sum of clicks / sum of the
    shipped weights' clicks on the same instances), ensam_seg after that many labels, fine-tuning minutes, the
    largest forgetting, the Spearman rho per round; and the issue's targets, met or not."""
    out = {}
    for order, o in result["orders"].items():
        late = [s for s in o["steps"] if s["labels_so_far"] >= cfg.saving_after]
        if late:
            shipped = sum(s["shipped_clicks"] for s in late)
            saving = None if shipped == 0 else round(1.0 - sum(s["clicks"] for s in late) / shipped, 4)
        else:
            saving = None
        seg_after = [r for r in o["rounds"] if r["labels_so_far"] >= cfg.saving_after]
        rhos = [r.get("spearman", {}).get("rho") for r in o["rounds"]]
        forg = [r["forgetting"]["max"] for r in o["rounds"][1:] if r.get("forgetting")]
        mins = [r["train"]["minutes"] for r in o["rounds"][1:] if r.get("train")]
        first_saving = None
        for s in o["steps"]:  # labels needed before an instance reaches the 30 % saving
            if s["click_saving"] is not None and s["click_saving"] >= 0.30 and s["round"] > 0:
                first_saving = s["labels_so_far"]
                break
        base = result.get("baseline") or {}
        out[order] = {
            "instances_after": len(late),
            "click_saving_after": saving,
            "clicks_after": [s["clicks"] for s in late],
            "shipped_clicks_after": [s["shipped_clicks"] for s in late],
            "reached_after": sum(bool(s["reached"]) for s in late),
            "shipped_reached_after": sum(bool(base.get(s["image_id"], {}).get("reached")) for s in late),
            # clicks are capped at max_clicks: where both runs hit the cap, the DSC they end at still differs
            "final_dsc_after": _mean([s["final_dsc"] for s in late]),
            "shipped_final_dsc_after": _mean([base[s["image_id"]]["final_dsc"] for s in late if s["image_id"] in base]),
            "box_dsc_after": _mean([s["box_dsc"] for s in late]),
            "shipped_box_dsc_after": _mean([base[s["image_id"]]["box_dsc"] for s in late if s["image_id"] in base]),
            "ensam_seg_mean_per_round": [r["ensam_seg_mean"] for r in o["rounds"]],
            "ensam_seg_mean_after": seg_after[-1]["ensam_seg_mean"] if seg_after else None,
            "train_minutes_per_round": mins,
            "forgetting_max_per_round": forg,
            "spearman_per_round": rhos,
            "labels_to_30pct_saving": first_saving,
            "targets": {
                "click_saving_30pct_after_5": None if saving is None else saving >= 0.30,
                "ensam_seg_0.70_after_5": None if not seg_after or seg_after[-1]["ensam_seg_mean"] is None
                else seg_after[-1]["ensam_seg_mean"] >= 0.70,
                "forgetting_at_most_0.02": None if not forg else max(forg) <= 0.02,
                "train_round_at_most_5_cpu_min": None if not mins else max(mins) <= 5.0,
                "spearman_at_least_0.5": None if not [r for r in rhos if r is not None]
                else all(r >= 0.5 for r in rhos if r is not None),
            },
        }
    return out


def _shown(path: str) -> str:
    """A path as the result shows it: relative to the repository when inside it."""
    rel = os.path.relpath(os.path.abspath(path), REPO)
    return path if rel.startswith("..") else rel


def _mean(values: Sequence[float]) -> Optional[float]:
    return round(float(np.mean(values)), 4) if len(values) else None


def _machine(threads: int) -> dict:
    import platform

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": threads,
            "processor": platform.processor() or platform.machine()}


def plot(result: dict, out_prefix: str) -> List[str]:
    """``<prefix>_clicks.png`` (clicks to the target vs labels so far, per order, with the shipped weights' clicks
    on the same instances) and ``<prefix>_seg.png`` (mean ensam_seg DSC on the unlabelled instances vs labels so
    far, per order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    paths = []
    orders = result["orders"]
    base = result.get("baseline") or {}
    fig, axes = plt.subplots(2, len(orders), figsize=(4.2 * len(orders), 6.4), squeeze=False, sharey="row")
    for ax, (order, o) in zip(axes[1], orders.items()):
        x = [s["labels_so_far"] for s in o["steps"]]
        ax.plot(x, [base.get(s["image_id"], {}).get("final_dsc", np.nan) for s in o["steps"]], "s--", color="grey",
                label="shipped weights")
        ax.plot(x, [s["final_dsc"] for s in o["steps"]], "o-", color="C0", label="loop")
        for r in o["rounds"][1:]:
            ax.axvline(r["labels_so_far"] - 0.5, color="C2", lw=0.8, ls=":")
        ax.axhline(cfg["target"], color="k", lw=0.6)
        ax.set_xlabel("labels saved before this instance")
        ax.set_ylim(0, 1)
    axes[1][0].set_ylabel("DSC when the annotator stopped")
    for ax, (order, o) in zip(axes[0], orders.items()):
        x = [s["labels_so_far"] for s in o["steps"]]
        ax.plot(x, [s["shipped_clicks"] for s in o["steps"]], "s--", color="grey", label="shipped weights")
        ax.plot(x, [s["clicks"] for s in o["steps"]], "o-", color="C0", label="loop")
        for s in o["steps"]:
            if not s["reached"]:
                ax.plot(s["labels_so_far"], s["clicks"], "x", color="C3", ms=9)
        for r in o["rounds"][1:]:
            ax.axvline(r["labels_so_far"] - 0.5, color="C2", lw=0.8, ls=":")
        ax.set_title(order)
        ax.set_ylim(-0.5, cfg["max_clicks"] + 0.5)
    axes[0][0].set_ylabel(f"clicks to DSC {cfg['target']:.2f} (x: not reached)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"labelling loop, {cfg['family']} (dotted: fine-tuning rounds; grey: shipped weights)", fontsize=10)
    fig.tight_layout()
    paths.append(out_prefix + "_clicks.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for n, (order, o) in enumerate(orders.items()):
        xs = [r["labels_so_far"] for r in o["rounds"]]
        ys = [np.nan if r["ensam_seg_mean"] is None else r["ensam_seg_mean"] for r in o["rounds"]]
        ax.plot(xs, ys, "o-", color=f"C{n}", label=order)
    ax.set_xlabel("labels saved")
    ax.set_ylabel("ensam_seg mean DSC, unlabelled instances")
    ax.set_ylim(0, 1)
    used = sorted({r["ensam_seg_route"] for o in orders.values() for r in o["rounds"] if r.get("ensam_seg_route")})
    ax.set_title(f"labelling loop, {cfg['family']}: ensam_seg (route {', '.join(used) or '-'})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_prefix + "_seg.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
