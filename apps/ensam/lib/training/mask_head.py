"""Train the multi-mask head (lib/network/mask_head.py) on lone-click prompts, the rest of the network frozen.

A lone click is ambiguous (part, whole, wider); the head adds ``n_masks - 1`` answers to the network's own and a
predicted DSC for each. Recipe (issue 27, item 2): the shipped main weights, unchanged, are the trunk (so the box
protocol and every prompt with a region answer exactly as before, through mask 0); per step one lone-click case
drawn as pre-training draws it (:func:`lib.training.pretrain.draw_case` with ``p_no_box`` 1), the trunk run once
without gradient, the head's masks trained with the loss of the BEST mask only (the masks specialise: whichever
is closest learns); every mask's features and real DSC are kept, and at each validation the quality head is fitted
on them (:func:`fit_quality`, full batch: calibration + which mask is best). Single-sample SGD of the quality head
beside the masks did not learn to choose in 300 steps (it picked the smallest mask every time: chosen 0.13 against
mask 0's 0.37 on the validation cases); the full-batch fit on standardised features does.
Cheap on a CPU: no backward through the trunk.

    PYTHONPATH=apps/ensam python -m lib.training.mask_head --init apps/ensam/model/pretrained_ensam.pt \\
        --out runs/mask_head --minutes 60

Writes ``<out>/last.pt`` (head, optimiser, step; ``--resume`` continues it), ``<out>/log.txt``, and
``<out>/best.pt``: an artefact (lib.weights) with the init's main weights plus the head, the init's refiner and
contract, and the validation figures in its meta (``mask_head``) -- a release candidate for the evaluator.
Validation: fixed lone-click cases of the held-out structures in the engine's view (pre-training's validation
with one-click starts only): mask 0's DSC, the best mask's (oracle) and the chosen one's (highest predicted DSC).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..engine import load_network
from ..evaluation.metrics import dice
from ..network import EnsamNet, add_mask_head, dense_prompt_maps
from ..network.mask_head import N_MASK_STATS
from ..weights import load_artefact, save_artefact
from . import data as D
from .pretrain import PretrainConfig, build_validation, draw_case, select_volumes

__all__ = ["HeadConfig", "masks_and_features", "masks_and_quality", "head_loss", "quality_loss", "fit_quality", "validate", "run", "main"]


@dataclass
class HeadConfig:
    init: str = "apps/ensam/model/pretrained_ensam.pt"
    out: str = "runs/mask_head"
    n_masks: int = 3
    minutes: float = 60.0
    max_steps: int = 0
    lr: float = 1e-3
    buffer: int = 4000          # samples kept for the quality fit (features and DSC of every mask)
    threads: int = 1
    seed: int = 0
    data: str = D.TRAIN_ROOT
    volumes: List[str] = field(default_factory=list)
    val_cases: int = 6          # lone-click validation cases per held-out structure
    val_every: int = 150        # steps
    loop: dict = field(default_factory=lambda: {"p_no_box": 1.0, "p_concept": 0.0,
                                                "click_view_object": [1.2, 6.0], "p_click_view_object": 0.3})


def _frozen_trunk(net: EnsamNet, case, sigma: float, device="cpu"):
    """(mask 0's logits, x, tokens, offset, out_shape) of ``net`` (EnsamNet._decode) for a case's prompt (click maps
    of ``sigma`` model voxels, the contract's), without gradient: the frozen trunk."""
    with torch.no_grad():
        feats = net.encode(case.image.to(device))
        p = torch.as_tensor(case.points, dtype=torch.float32, device=device)[None]
        t = torch.as_tensor(case.types, dtype=torch.long, device=device)[None]
        dense = dense_prompt_maps(p, t, tuple(feats[0].shape[2:]), None, sigma=sigma)
        logits0, x, tokens, offset, out_shape = net._decode(feats, p, t, dense, None)
    return logits0, x, tokens, offset, out_shape


def masks_and_features(net: EnsamNet, trunk):
    """The K masks' logits (1, K, *shape; the head's parameters carry gradient) and the quality head's input
    features (1, K, d) of those masks, read on the padded grid as :meth:`EnsamNet.decode_masks` reads them, from the
    frozen trunk's outputs."""
    logits0, x, tokens, offset, out_shape = trunk
    logits = net.head_masks(logits0, x, tokens, offset)
    feats = net.mask_head.features(x, tokens, logits.detach())
    return logits[:, :, : out_shape[0], : out_shape[1], : out_shape[2]], feats


def masks_and_quality(net: EnsamNet, trunk):
    """The K masks' logits (1, K, *shape) and their predicted DSC logits (1, K) from the frozen trunk's outputs."""
    logits, feats = masks_and_features(net, trunk)
    return logits, net.mask_head.quality_of(feats)


def _per_mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice + 0.3 BCE per mask (the training loop's weights): logits (1, K, *s), target (*s) -> (K,)."""
    lg = logits[0].float()
    tg = target.expand_as(lg)
    bce = F.binary_cross_entropy_with_logits(lg, tg, reduction="none").flatten(1).mean(1)
    p = torch.sigmoid(lg).flatten(1)
    inter = (p * tg.flatten(1)).sum(1)
    soft_dice = 1 - (2 * inter + 1.0) / (p.sum(1) + tg.flatten(1).sum(1) + 1.0)
    return soft_dice + 0.3 * bce


def head_loss(logits: torch.Tensor, gt: np.ndarray):
    """The masks' loss: the loss of the best mask only (best-of-K: whichever mask is closest learns, so the masks
    specialise). Returns (loss, the hard DSC of every mask)."""
    target = torch.as_tensor(gt, dtype=torch.float32)
    per = _per_mask_loss(logits, target)
    hard = (logits.detach()[0] > 0).numpy()
    dsc = np.array([dice(m, gt) for m in hard], dtype=np.float32)
    return per.min(), dsc


def quality_loss(q: torch.Tensor, dsc: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """q (N, K) predicted DSC logits, dsc (N, K) real: BCE of each prediction against its DSC (calibration) + the
    cross-entropy of softmax(q) against softmax(dsc / ``temperature``) (the choice, what the engine uses)."""
    calib = F.binary_cross_entropy_with_logits(q, dsc)
    soft = torch.softmax(dsc / temperature, dim=1)
    return calib - (soft * torch.log_softmax(q, dim=1)).sum(1).mean()


def fit_quality(head, feats: np.ndarray, dsc: np.ndarray, epochs: int = 300, lr: float = 1e-2,
                weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Fit the head's quality MLP on collected samples, full batch: feats (N, K, d) of
    :meth:`MultiMaskHead.features`, dsc (N, K). Only the mask's own columns (the features inside it and its
    statistics: the last C0 + 3) are used: the prompt tokens are the same for every mask of a prompt and cannot
    tell them apart. The columns are standardised for the fit and the standardisation folded into the first layer
    (the head keeps its shape). Returns the final training loss."""
    mlp = head.quality
    d_used = head.bias.in_channels + N_MASK_STATS
    x = torch.as_tensor(feats[..., -d_used:], dtype=torch.float32)
    y = torch.as_tensor(dsc, dtype=torch.float32)
    mean = x.flatten(0, 1).mean(0)
    std = x.flatten(0, 1).std(0).clamp(min=1e-4)
    z = (x - mean) / std
    g = torch.Generator().manual_seed(seed)
    hidden = mlp[0].out_features
    w1 = (torch.randn(hidden, d_used, generator=g) / d_used ** 0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(1, hidden, generator=g) / hidden ** 0.5).requires_grad_()
    b2 = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([w1, b1, w2, b2], lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        q = (F.gelu(z @ w1.T + b1) @ w2.T + b2)[..., 0]
        loss = quality_loss(q, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mlp[0].weight.zero_()
        mlp[0].weight[:, -d_used:] = w1 / std
        mlp[0].bias.copy_(b1 - (w1 / std) @ mean)
        mlp[2].weight.copy_(w2)
        mlp[2].bias.copy_(b2)
    return float(loss)


def validate(net: EnsamNet, cases, sigma: float) -> dict:
    """Mean DSC of mask 0, of the best mask (oracle) and of the chosen one (highest predicted DSC)."""
    m0, oracle, chosen, picks = [], [], [], []
    with torch.no_grad():
        for c in cases:
            logits, quality = masks_and_quality(net, _frozen_trunk(net, c, sigma))
            d = [dice(m, c.gt) for m in (logits[0] > 0).numpy()]
            k = int(torch.argmax(quality[0]))
            m0.append(d[0])
            oracle.append(max(d))
            chosen.append(d[k])
            picks.append(k)
    return {"mask0": float(np.mean(m0)), "oracle": float(np.mean(oracle)), "chosen": float(np.mean(chosen)),
            "picks": np.bincount(picks, minlength=net.config.n_masks).tolist(), "n": len(cases)}


def _log(out: Path, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(out / "log.txt", "a") as f:
        f.write(line + "\n")


def run(cfg: HeadConfig, resume: bool = False, progress: bool = True) -> dict:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    art = load_artefact(cfg.init)
    base = load_network(art)
    if base.mask_head is not None:  # continuing a candidate that already has a head
        net = base
    else:
        net = add_mask_head(base, cfg.n_masks)
    for name, prm in net.named_parameters():
        prm.requires_grad_(name.startswith("mask_head."))
    net.eval()  # the trunk's norms in inference mode: the head learns the features the engine will give it
    opt = torch.optim.AdamW(net.mask_head.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    state = {"step": 0, "seconds": 0.0, "best": -1.0, "history": [], "feats": [], "dsc": []}
    last = out / "last.pt"
    if resume and last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        net.mask_head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["opt"])
        for g in opt.param_groups:  # the command line's learning rate wins over the checkpoint's
            g["lr"] = cfg.lr
        state = {"feats": [], "dsc": [], **ck["state"]}
        rng.bit_generator.state = ck["rng"]
        _log(out, f"resumed at step {state['step']} ({state['seconds'] / 60:.1f} min)")

    pcfg = PretrainConfig(data=cfg.data, volumes=cfg.volumes, loop=dict(cfg.loop), contract=art.contract or {},
                          network=net.config.to_dict(), val_per_structure=0, val_click_start=cfg.val_cases,
                          val_synthetic=0, val_concept=0)
    lcfg = pcfg.loop_config()
    sigma = lcfg.contract.click_sigma
    volumes = select_volumes(D.load_volumes(cfg.data, seed=0), cfg.volumes)
    sampler = D.ObjectSampler(volumes, holdout=pcfg.holdout, weights=pcfg.source_weights)
    val_cases = build_validation(volumes, pcfg, lcfg)
    _log(out, f"{len(sampler.structures)} training structures, {len(val_cases)} lone-click validation cases")
    if state["step"] == 0:
        v = validate(net, val_cases, sigma)
        state["history"].append({"step": 0, **v})
        _log(out, f"step 0 (warm start): {json.dumps(v)}")

    def save_last():
        tmp = out / "last.pt.tmp"
        torch.save({"head": net.mask_head.state_dict(), "opt": opt.state_dict(), "state": state,
                    "rng": rng.bit_generator.state}, tmp)
        os.replace(tmp, last)

    def export(v: dict) -> None:
        meta = copy.deepcopy(art.meta)
        meta["network"] = net.config.to_dict()
        meta["mask_head"] = {"step": state["step"], "validation": v, "recipe": "lib.training.mask_head",
                             "lr": cfg.lr, "n_masks": cfg.n_masks}
        sd = {k: v_.detach().clone() for k, v_ in net.state_dict().items()}
        save_artefact(str(out / "best.pt"), sd, meta, refiner=art.refiner)

    bar = tqdm(total=cfg.max_steps or None, disable=not progress, desc="mask head")
    t_last = time.time()
    window = []
    while True:
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            break
        if state["seconds"] >= cfg.minutes * 60:
            break
        case = draw_case(sampler, rng, lcfg, concept=False)
        trunk = _frozen_trunk(net, case, sigma)
        logits, feats = masks_and_features(net, trunk)
        loss, dsc = head_loss(logits, case.gt)
        state["feats"].append(feats[0].detach().numpy().astype(np.float32))
        state["dsc"].append(dsc)
        del state["feats"][: -cfg.buffer], state["dsc"][: -cfg.buffer]
        opt.zero_grad()
        loss.backward()
        opt.step()
        state["step"] += 1
        now = time.time()
        state["seconds"] += min(now - t_last, 120.0)
        t_last = now
        window.append([float(loss.detach()), float(dsc[0]), float(dsc.max())])
        bar.update(1)
        if state["step"] % cfg.val_every == 0:
            w = np.mean(window, axis=0)
            window = []
            fit = fit_quality(net.mask_head, np.stack(state["feats"]), np.stack(state["dsc"]), seed=state["step"])
            v = validate(net, val_cases, sigma)
            v["quality_fit_loss"] = round(fit, 4)
            v["quality_samples"] = len(state["dsc"])
            state["history"].append({"step": state["step"], **v})
            _log(out, f"step {state['step']} loss {w[0]:.3f} train mask0 {w[1]:.3f} best {w[2]:.3f} | val "
                      f"{json.dumps(v)}")
            if v["chosen"] > state["best"]:
                state["best"] = v["chosen"]
                export(v)
                _log(out, f"best so far (chosen {v['chosen']:.3f}): {out / 'best.pt'}")
            save_last()
            t_last = time.time()
    save_last()
    bar.close()
    return state


def parse_args(argv=None) -> tuple:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = HeadConfig()
    for name in ("init", "out"):
        ap.add_argument(f"--{name}", default=getattr(d, name))
    for name in ("n_masks", "max_steps", "threads", "seed", "val_cases", "val_every"):
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=getattr(d, name))
    for name in ("minutes", "lr"):
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=getattr(d, name))
    ap.add_argument("--volumes", default="", help="comma-separated training volumes (default: all)")
    ap.add_argument("--p-view-object", type=float, default=d.loop["p_click_view_object"],
                    help="share of lone-click samples seen in an object-relative view (0: all in the engine's view)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    cfg = HeadConfig(**{k: getattr(a, k) for k in ("init", "out", "n_masks", "max_steps", "threads", "seed",
                                                   "val_cases", "val_every", "minutes", "lr")},
                     volumes=[v for v in a.volumes.split(",") if v],
                     loop={**d.loop, "p_click_view_object": a.p_view_object})
    return cfg, a.resume, not a.no_progress


def main(argv=None) -> None:
    cfg, resume, progress = parse_args(argv)
    run(cfg, resume=resume, progress=progress)


if __name__ == "__main__":
    main()
