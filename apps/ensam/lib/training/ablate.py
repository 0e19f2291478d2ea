"""Ablations at the same small budget: Muon vs AdamW, rotary vs absolute positions, ENSAM vs SAMU, SegResNet vs
xLSTM image encoder.

Usage (from the repository root; runs the arms one after another, each resumable)::

    PYTHONPATH=apps/ensam python -m lib.training.ablate --out runs/ablate --minutes 20
        [--arms base,adamw,absolute,samu,xlstm] [--threads 1] [--eval-data sample-datasets/eval]
        [--eval-max-structures 8] [--skip-train] [--skip-eval]

Each arm is a ``lib.training.pretrain`` run in ``<out>/<arm>`` (same seed, data, validation and budget; only the
ablated setting differs from ``base``), then its best weights go through the interactive evaluator
(``lib.evaluation.evaluator.evaluate`` with ``EnsamMethod``; box + 5 clicks) on the evaluation set. Writes
``<out>/ablation.json`` and ``<out>/ablation.md`` (the table for the model card).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["ARMS", "train_arm", "evaluate_arm", "main"]

# arm -> (network overrides, optimizer)
ARMS: Dict[str, tuple] = {
    "base": ({}, "muon"),                          # ENSAM, rotary, Muon + AdamW
    "adamw": ({}, "adamw"),                        # optimiser ablation
    "absolute": ({"positional": "absolute"}, "muon"),  # positional-encoding ablation
    "samu": ({"variant": "samu"}, "muon"),         # prompt attention at every decoder scale
    "xlstm": ({"encoder": "xlstm"}, "muon"),       # issue 14: xLSTM image encoder (lib/network/xlstm.py)
}


def train_arm(arm: str, out: Path, minutes: float, threads: int = 1, extra: Optional[List[str]] = None,
              log=print) -> int:
    """Run (or resume) the pretraining of one arm in a subprocess; returns its exit code."""
    network, optimizer = ARMS[arm]
    run_dir = out / arm
    cmd = [sys.executable, "-m", "lib.training.pretrain", "--out", str(run_dir), "--minutes", str(minutes),
           "--optimizer", optimizer, "--threads", str(threads), "--network", json.dumps(network), "--no-progress"]
    if (run_dir / "last.pt").exists():
        cmd.append("--resume")
    cmd += list(extra or [])
    log(f"[ablate] {arm}: {' '.join(cmd)}")
    env = dict(os.environ)
    app = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = app + os.pathsep + env.get("PYTHONPATH", "")
    with open(out / f"{arm}.stdout.txt", "a") as f:
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def evaluate_arm(arm: str, weights: Path, data_dir: str, max_structures: Optional[int], device: str = "cpu",
                 log=print) -> dict:
    """Box + 5 clicks on the evaluation set with the arm's weights; returns the evaluator's overall summary
    (plus per-case summaries)."""
    from ..evaluation.evaluator import EnsamMethod, evaluate

    method = EnsamMethod(weights=str(weights), device=device, name=arm)
    res = evaluate([method], data_dir, max_structures=max_structures, progress=False, measure_memory=False,
                   log=log)
    m = res["methods"][arm]
    return {"overall": m["overall"], "by_case": m["by_case"]}


def _table(rows: Dict[str, dict], minutes: float) -> str:
    lines = [f"Ablations: {minutes:g} training minutes each (same data, seed and validation); evaluation set, "
             "box + 5 clicks.", "",
             "| arm | setting | steps | val box DSC | val DSC 2 clicks | box DSC | DSC_AUC | final DSC | final NSD |",
             "|---|---|---|---|---|---|---|---|---|"]
    desc = {"base": "ENSAM, rotary, Muon", "adamw": "AdamW only", "absolute": "absolute (Fourier) positions",
            "samu": "SAMU (attention at every decoder scale)", "xlstm": "xLSTM image encoder"}

    def f(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    for arm, r in rows.items():
        ev = (r.get("eval") or {}).get("overall", {})
        tr = r.get("train", {})
        lines.append(f"| {arm} | {desc.get(arm, '')} | {f(tr.get('step'))} | {f(tr.get('val_box_dsc'))} | "
                     f"{f(tr.get('val_click2_dsc'))} | {f(ev.get('box_dsc'))} | {f(ev.get('dsc_auc'))} | "
                     f"{f(ev.get('final_dsc'))} | {f(ev.get('final_nsd'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.training.ablate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--minutes", type=float, default=20.0, help="training minutes per arm")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-data", default="sample-datasets/eval")
    ap.add_argument("--eval-max-structures", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-eval", action="store_true")
    a, extra = ap.parse_known_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; choose from {list(ARMS)}")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(out / "ablate_log.txt", "a") as fh:
            fh.write(line + "\n")

    try:
        import torch
        torch.set_num_threads(a.threads)
    except Exception:  # pragma: no cover
        pass
    path = out / "ablation.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    for arm in arms:
        if not a.skip_train:
            rc = train_arm(arm, out, a.minutes, a.threads, extra, log)
            if rc != 0:
                log(f"[ablate] {arm}: training exited with {rc}; see {out / (arm + '.stdout.txt')}")
                continue
        best = out / arm / "best.pt"
        meta = out / arm / "best.json"
        row = rows.get(arm, {})
        if meta.exists():
            row["train"] = json.loads(meta.read_text())
        if not a.skip_eval and best.exists():
            try:
                row["eval"] = evaluate_arm(arm, best, a.eval_data, a.eval_max_structures, a.device, log)
            except ImportError as e:
                log(f"[ablate] {arm}: evaluator not available ({e}); training results only")
        rows[arm] = row
        path.write_text(json.dumps(rows, indent=1, default=str))
        (out / "ablation.md").write_text(_table(rows, a.minutes))
        log(f"[ablate] {arm}: done")
    print(_table(rows, a.minutes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
