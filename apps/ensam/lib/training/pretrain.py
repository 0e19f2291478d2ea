"""Pre-train ENSAM from scratch on the training volumes (real labels, pseudo-labels, synthetic objects).

Usage (from the repository root)::

    PYTHONPATH=apps/ensam python -m lib.training.pretrain --out runs/pretrain --minutes 100 [--resume]
        [--config file.json|yaml] [--network '{"variant": "samu"}'] [--optimizer adamw] [--threads 1]
        [--export runs/pretrain/best.pt] [--device auto]

``--minutes`` is the TOTAL training-time budget of the run (kept across ``--resume``). Writes into ``--out``:
``config.json`` (everything needed to reproduce), ``log.txt``, ``last.pt`` (model + optimiser + step + RNG
states, every ``--ckpt-minutes``), ``curves.png`` (loss and validation DSC), ``history.json``, and the best
weights (by validation) at ``--export`` (default ``<out>/best.pt``) as one artefact (:mod:`lib.weights`: fp32
state_dict + network config, training/inference contract, label vocabulary, step and validation scores), with
human-readable copies ``best.json`` / ``best_labels.json`` beside it. ``--init W`` starts a run that has no
``last.pt`` from the weights W (a new machine continues from the last committed weights).

Validation: structures held out of training (``--holdout``, default kidney_left, vertebrae_L1, rib_left_9,
iliopsoas_left of the training CT) plus held-out random pseudo-label / synthetic samples drawn with a separate
seed; measured as box-only DSC and DSC after 2 corrective clicks (model grid), plus prompt-free DSC.

This module is the run (cases, validation, the loop, the CLI); :mod:`lib.training.pretrain_config` holds
:class:`PretrainConfig` and how it is read from ``config.json`` / ``--config`` / flags, and
:mod:`lib.training.checkpoints` the files of weights (``last.pt``, the exported artefact, ``--init``). Their names
are importable from here as before.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from ..contract import Contract, check_same, read_contract
from ..engine import load_network
from ..geometry import bbox_edge_mm
from ..network import build_network
from ..weights import load_artefact
from . import data as D
from .checkpoints import export_weights, init_weights, load_checkpoint, save_checkpoint
from .loop import LoopConfig, bf16_ok, concept_case, evaluate, prompted_case, train_step
from .optim import build_optimizer, lr_factor
from .pretrain_config import PretrainConfig, config_from_args, load_config_file

__all__ = ["PretrainConfig", "run", "main", "build_validation", "draw_case", "save_checkpoint",
           "load_checkpoint", "export_weights", "init_weights", "select_volumes", "parse_args", "config_from_args",
           "load_config_file", "charged_seconds"]


def _log(out: Path, msg: str) -> None:
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(out / "log.txt", "a") as f:
        f.write(line + "\n")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # pragma: no cover
        return ""


# ----------------------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------------------

def draw_case(sampler: D.ObjectSampler, rng, cfg: LoopConfig, tries: int = 10, concept: Optional[bool] = None):
    """One training case from the sampler: prompt-free with probability ``cfg.p_concept``, else prompted."""
    for _ in range(tries):
        use_concept = (rng.random() < cfg.p_concept) if concept is None else concept
        if use_concept and any(s[3] >= 0 for s in sampler.structures):
            s, vid = sampler.concept_window(rng, window=cfg.contract.model_shape[0],
                                            spacing_mm=cfg.contract.label_spacing_mm)
            return concept_case(s.image, s.mask, vid, name=s.name)
        s = sampler.sample(rng)
        case = prompted_case(s.image, s.mask, s.spacing, rng, cfg, kind=s.kind, name=s.name)
        if case is not None:
            return case
    raise RuntimeError("could not draw a training case")


def _heldout_case(v: D.Volume, lab: int, name: str, rng, lcfg: LoopConfig, use_box: bool):
    """A validation case of one held-out structure (box start or one-click start), or None after 10 tries."""
    for _ in range(10):
        sl = v.bboxes[lab]
        region = D._region(v.image.shape, [s.start for s in sl], [s.stop - 1 for s in sl], v.spacing, rng)
        m = v.labels[region] == lab
        s = D.augment(D.Sample(D._norm01(v.image[region], v.lo, v.hi), m, v.spacing.copy()), rng)
        if s is None:
            continue
        c = prompted_case(s.image, s.mask, s.spacing, rng, lcfg, use_box=use_box, roi_jitter=False,
                          kind="heldout" if use_box else "heldout_click", name=name)
        if c is not None:
            c.seed = int(rng.integers(2 ** 31))
            return c
    return None


def build_validation(volumes, cfg: PretrainConfig, lcfg: LoopConfig) -> list:
    """The fixed validation cases (deterministic for a given data set and ``cfg.val_seed``); one-click starts use
    the engine's field of view around a lone click (not the training range)."""
    rng = np.random.default_rng(cfg.val_seed)
    lcfg = replace(lcfg, click_extent_scale=(1.0, 1.0), click_view_object=(), p_refine=0.0)  # validation: the
    # engine's plain box / click starts
    cases = []
    held = D.ObjectSampler(volumes, holdout=cfg.holdout, only_holdout=True)
    for vi, lab, name, vid in held.structures:
        for use_box, n in ((True, cfg.val_per_structure), (False, cfg.val_click_start)):
            for _ in range(n):
                c = _heldout_case(volumes[vi], lab, name, rng, lcfg, use_box)
                if c is not None:
                    cases.append(c)
    train_sampler = D.ObjectSampler(volumes, holdout=cfg.holdout, weights=cfg.source_weights,
                                    volume_weights=cfg.volume_weights)
    synth = [s for s in train_sampler.sources if s != "real"]
    for i in range(cfg.val_synthetic):
        src = synth[i % len(synth)]
        for _ in range(10):
            s = train_sampler.sample(rng, source=src)
            c = prompted_case(s.image, s.mask, s.spacing, rng, lcfg, use_box=True, roi_jitter=False, kind=src,
                              name=src)
            if c is not None:
                c.seed = int(rng.integers(2 ** 31))
                cases.append(c)
                break
    for _ in range(cfg.val_concept):
        s, vid = train_sampler.concept_window(rng, aug=False, p_centred=1.0, window=lcfg.contract.model_shape[0],
                                              spacing_mm=lcfg.contract.label_spacing_mm)
        cases.append(concept_case(s.image, s.mask, vid, name=s.name))
    return cases


def build_large_click_validation(volumes, cfg: PretrainConfig, lcfg: LoopConfig) -> list:
    """``cfg.val_click_large`` lone-click cases (the engine's view around the click, as :func:`build_validation`'s
    one-click starts) on every training structure whose largest extent is at least ``cfg.val_large_view`` x that
    view: the view is then all organ, and the corrective clicks must grow the answer to fill it (deterministic for a
    given data set and ``cfg.val_seed``). In-sample by design: it checks a behaviour the held-out structures (none
    that large) cannot show."""
    if cfg.val_click_large <= 0:
        return []
    rng = np.random.default_rng(cfg.val_seed + 1)
    lcfg = replace(lcfg, click_extent_scale=(1.0, 1.0), click_view_object=(), p_refine=0.0)
    view = lcfg.contract.roi.click_extent_mm
    held = set(cfg.holdout)
    cases = []
    for v in volumes:
        for lab in sorted(v.bboxes):
            name = v.names.get(lab, str(lab))
            extent = bbox_edge_mm([i for s in v.bboxes[lab] for i in (s.start, s.stop - 1)], v.spacing)
            if name in held or extent < cfg.val_large_view * view:
                continue
            for _ in range(cfg.val_click_large):
                c = _heldout_case(v, lab, name, rng, lcfg, use_box=False)
                if c is not None:
                    c.kind = "large_click"
                    cases.append(c)
    return cases


def select_volumes(volumes: list, names: List[str]) -> list:
    """The volumes named in ``names`` (all when empty); a name that is not loaded is an error."""
    if not names:
        return list(volumes)
    unknown = sorted(set(names) - {v.name for v in volumes})
    if unknown:
        raise ValueError(f"volumes: not in the data: {unknown}")
    return [v for v in volumes if v.name in set(names)]


def charged_seconds(dt: float, recent, factor: float = 10.0, first_cap: float = 120.0) -> float:
    """The seconds one training step is charged against the run's budget: its wall time, but at most ``factor`` x
    the median of the ``recent`` steps' charges (after 5 of them; before, at most ``first_cap`` seconds), so a pause
    (the process stopped with SIGSTOP for a quiet benchmark, or a suspended machine) does not eat the budget and
    compress the learning-rate schedule."""
    if len(recent) < 5:
        return float(min(dt, first_cap))
    return float(min(dt, factor * float(np.median(list(recent)))))


def plot_curves(out: Path, history: list, val_history: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if history:
        st = [h["step"] for h in history]
        ax[0].plot(st, [h["loss"] for h in history], lw=0.5, alpha=0.4, label="loss")
        ax[0].plot(st, [h["loss_ema"] for h in history], lw=1.5, label="loss (EMA)")
        ax[0].set_xlabel("step")
        ax[0].set_ylabel("Dice + BCE")
        ax[0].legend()
    if val_history:
        st = [v["step"] for v in val_history]
        for k in [k for k in val_history[-1] if k.startswith("val_")]:
            ax[1].plot(st, [v.get(k, np.nan) for v in val_history], marker="o", label=k)
        ax[1].set_xlabel("step")
        ax[1].set_ylabel("DSC")
        ax[1].set_ylim(0, 1)
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------

def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run(cfg: PretrainConfig, resume: bool = False, progress: bool = True) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(cfg.threads)))
    device = _device(cfg.device)
    amp = device.startswith("cuda") or (device == "cpu" and cfg.cpu_bf16 and bf16_ok(device))
    export = Path(cfg.export or out / "best.pt")
    ncfg = cfg.network_config()
    lcfg = cfg.loop_config()
    ckpt = out / "last.pt"
    if resume and (out / "config.json").exists():
        old = json.loads((out / "config.json").read_text())["pretrain"]
        if old.get("network") != cfg.network or old.get("optimizer") != cfg.optimizer:
            raise SystemExit(f"--resume: network/optimizer differ from {out / 'config.json'}")
        saved = json.loads((out / "config.json").read_text()).get("contract")
        if saved is not None:  # a run never changes its contract half-way
            check_same(Contract.from_dict(saved), lcfg.contract, f"the run {out}", "this configuration")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    net = build_network(ncfg).to(device)
    first_net = None
    if cfg.first_answers:  # the frozen main weights: read once, same contract, every parameter loaded (strict)
        art = load_artefact(cfg.first_answers)
        check_same(read_contract(art, ncfg), lcfg.contract, f"first_answers {cfg.first_answers}", "this run")
        first_net = load_network(art, ncfg, device).requires_grad_(False)
    opt = build_optimizer(net, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          muon_lr_scale=cfg.muon_lr_scale)
    n_params = sum(p.numel() for p in net.parameters())

    t0 = time.time()
    volumes = select_volumes(D.load_volumes(cfg.data, seed=cfg.seed), cfg.volumes)
    if any(cfg.source_weights.get(k, 0) > 0 for k in ("slic", "watershed")):
        D.precompute(volumes, cfg.cache, log=lambda m: _log(out, m))
    sampler = D.ObjectSampler(volumes, holdout=cfg.holdout, weights=cfg.source_weights,
                              volume_weights=cfg.volume_weights)
    val_cases = build_validation(volumes, cfg, lcfg)
    large_cases = build_large_click_validation(volumes, cfg, lcfg)
    _log(out, f"data ready in {time.time() - t0:.1f} s: {[v.name for v in volumes]}, {len(sampler.structures)} "
              f"training structures, sources {sampler.sources}, {len(val_cases)} validation cases"
              + (f", {len(large_cases)} lone-click cases on large structures" if large_cases else ""))

    state = {"step": 0, "elapsed": 0.0, "history": [], "val_history": [], "best": -1.0, "best_step": -1,
             "loss_ema": None, "samples": 0}
    val_names = [f"{c.kind}:{c.name}" for c in val_cases + large_cases]
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, net, opt, rng)
        _log(out, f"resumed from {ckpt}: step {state['step']}, {state['elapsed'] / 60:.1f} min trained")
        if state.get("val_names", val_names) != val_names:  # new data: scores before and after don't compare
            _log(out, "the validation cases changed (training data changed): the best score restarts")
            state["best"], state["best_step"] = -1.0, -1
            state["val_history"].append({"step": state["step"], "elapsed": state["elapsed"], "note": "new data"})
    elif cfg.init:
        init_weights(net, cfg.init, cfg.init_refiner)
        _log(out, f"no {ckpt}: starting from the weights {cfg.init}{' (its refiner)' if cfg.init_refiner else ''} "
                  f"(fresh optimiser, step 0)")
        try:
            check_same(read_contract(cfg.init, ncfg), lcfg.contract, f"--init {cfg.init}", "this run")
        except ValueError as e:  # allowed (the new weights carry the new contract), but say so
            _log(out, f"note: {e}")
    elif resume:
        _log(out, f"--resume: no {ckpt}, starting fresh")

    config_record = {
        "pretrain": asdict(cfg), "network_config": ncfg.to_dict(), "loop_config": lcfg.to_dict(),
        "contract": lcfg.contract.to_dict(),
        "parameters": n_params, "device": device, "amp": amp, "torch": torch.__version__,
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
        "git_commit": _git_commit(), "argv": sys.argv, "volumes": [
            {"name": v.name, "shape": list(v.image.shape), "spacing": v.spacing.tolist(), "modality": v.modality}
            for v in volumes],
        "validation_cases": [{"kind": c.kind, "name": c.name} for c in val_cases],
        "started": state.get("started") or time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    state.setdefault("started", config_record["started"])
    state["val_names"] = val_names
    (out / "config.json").write_text(json.dumps(config_record, indent=1, default=str))
    _log(out, f"network {ncfg.to_dict()} ({n_params / 1e6:.2f} M parameters), optimizer {cfg.optimizer}, "
              f"device {device}, threads {torch.get_num_threads()}, budget {cfg.minutes} min")

    budget = cfg.minutes * 60.0
    stop = {"flag": False}

    def _stop(signum, frame):  # save and exit cleanly on SIGTERM / SIGINT
        stop["flag"] = True

    old_handlers = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}

    def validate():
        tv = time.time()
        scores = evaluate(net, val_cases, n_clicks=2, device=device, cfg=lcfg, first_net=first_net)
        parts = [scores["val_box_dsc"], scores["val_click2_dsc"]]
        if "val_oneclick_dsc" in scores:  # recipe v3: the one-click start counts as much as the box start
            parts.append(scores["val_oneclick_dsc"])
        if large_cases:  # a large organ grown from a lone click (stop 36)
            scores["val_large_click2_dsc"] = evaluate(net, large_cases, n_clicks=2, device=device, cfg=lcfg,
                                                      first_net=first_net)["val_click2_dsc"]
            parts.append(scores["val_large_click2_dsc"])
        score = float(np.mean(parts)) - cfg.val_harmful_weight * scores.get("val_harmful", 0.0)
        rec = {"step": state["step"], "elapsed": state["elapsed"], "score": score, **scores}
        state["val_history"].append(rec)
        msg = " ".join(f"{k}={v:.3f}" for k, v in scores.items())
        meta = {"step": state["step"], "minutes_trained": state["elapsed"] / 60, "device": device,
                "network": ncfg.to_dict(), "contract": lcfg.contract.to_dict(), **scores, "run": str(out),
                "optimizer": cfg.optimizer, **({"first_answers": cfg.first_answers} if first_net is not None else {})}
        if cfg.keep_validated:  # every validated checkpoint, to choose among on the tuning split afterwards
            (out / "validated").mkdir(exist_ok=True)
            export_weights(net, out / "validated" / f"step{state['step']}.pt", meta)
        if score > state["best"]:
            state["best"], state["best_step"] = score, state["step"]
            export_weights(net, export, meta)
            msg += f"  -> new best, exported {export}"
        _log(out, f"[val] step {state['step']} ({time.time() - tv:.0f} s) {msg}")
        plot_curves(out, state["history"], state["val_history"])
        (out / "history.json").write_text(json.dumps({"train": state["history"], "val": state["val_history"]}))

    if not state["val_history"] or state["best"] < 0:
        validate()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=int(budget), initial=int(min(state["elapsed"], budget)), unit="s", desc="pretrain",
                   mininterval=5, dynamic_ncols=True, file=sys.stdout)
    last_ckpt = last_val = time.time()
    window_t, window_n = time.time(), 0
    recent = collections.deque(maxlen=50)  # the last steps' charged seconds (charged_seconds)
    try:
        while state["elapsed"] < budget and not stop["flag"]:
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                break
            ts = time.time()
            opt.set_lr_factor(lr_factor(state["step"], state["elapsed"] / budget, cfg.warmup_steps,
                                        cfg.final_lr_fraction))
            case = draw_case(sampler, rng, lcfg)
            loss, dices = train_step(net, opt, case, rng, lcfg, device, amp, cfg.grad_clip, first_net=first_net)
            dt = charged_seconds(time.time() - ts, recent)
            recent.append(dt)
            state["elapsed"] += dt
            state["step"] += 1
            state["samples"] += 1
            window_n += 1
            ema = loss if state["loss_ema"] is None else 0.98 * state["loss_ema"] + 0.02 * loss
            state["loss_ema"] = ema
            state["history"].append({"step": state["step"], "elapsed": round(state["elapsed"], 1),
                                     "loss": round(loss, 4), "loss_ema": round(ema, 4), "kind": case.kind,
                                     "dsc0": round(dices[0], 3), "dsc_last": round(dices[-1], 3),
                                     "clicks": len(dices) - 1})
            if bar is not None:
                bar.update(int(state["elapsed"]) - bar.n)
                bar.set_postfix(step=state["step"], loss=f"{ema:.3f}", refresh=False)
            if state["step"] % 25 == 0:
                sps = window_n / max(time.time() - window_t, 1e-6)
                window_t, window_n = time.time(), 0
                _log(out, f"step {state['step']} loss_ema {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                          f"{sps:.3f} samples/s, {state['elapsed'] / 60:.1f}/{cfg.minutes} min")
            if time.time() - last_val >= cfg.val_minutes * 60:
                validate()
                last_val = time.time()
            if time.time() - last_ckpt >= cfg.ckpt_minutes * 60:
                save_checkpoint(ckpt, net, opt, state, rng)
                last_ckpt = time.time()
    finally:
        if bar is not None:
            bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    finished = state["elapsed"] >= budget or bool(cfg.max_steps and state["step"] >= cfg.max_steps)
    if finished and (not state["val_history"] or state["val_history"][-1]["step"] != state["step"]):
        validate()
    save_checkpoint(ckpt, net, opt, state, rng)
    _log(out, f"{'finished' if finished else 'stopped (resumable with --resume)'} at step {state['step']}, "
              f"{state['elapsed'] / 60:.1f} min trained; best score {state['best']:.3f} at step {state['best_step']}"
              f" -> {export}")
    return state


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lib.training.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="run folder (default runs/pretrain)")
    p.add_argument("--minutes", type=float, help="total training-time budget in minutes")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--config", help="JSON or YAML file with PretrainConfig fields (CLI flags win)")
    p.add_argument("--network", help="JSON object of NetworkConfig fields, e.g. '{\"variant\": \"samu\"}'")
    p.add_argument("--optimizer", choices=["muon", "adamw"])
    p.add_argument("--threads", type=int)
    p.add_argument("--export", help="where the best weights go (default <out>/best.pt)")
    p.add_argument("--init", help="weights to start from when <out> has no last.pt (fresh optimiser)")
    p.add_argument("--first-answers", dest="first_answers",
                   help="train a refiner: these weights' main network (frozen) answers the first prompts")
    p.add_argument("--device", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-steps", type=int, dest="max_steps")
    p.add_argument("--val-minutes", type=float, dest="val_minutes")
    p.add_argument("--ckpt-minutes", type=float, dest="ckpt_minutes")
    p.add_argument("--data", help="training data root (dataset.json); never the evaluation set")
    p.add_argument("--loop", help="JSON object of LoopConfig fields, e.g. '{\"max_clicks\": 3}'")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    cfg = config_from_args(a)
    run(cfg, resume=a.resume, progress=not a.no_progress)


if __name__ == "__main__":
    main()
