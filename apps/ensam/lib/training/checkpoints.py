"""Pre-training's files of weights: the run's checkpoint ``last.pt`` (model + optimiser + training state + RNG
states, :func:`save_checkpoint` / :func:`load_checkpoint`), the exported best weights (:func:`export_weights`, one
:mod:`lib.weights` artefact) and the weights a run starts from (:func:`init_weights`)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..labels import vocabulary
from ..weights import load_artefact, save_artefact

__all__ = ["save_checkpoint", "load_checkpoint", "init_weights", "export_weights"]


def _rng_state(rng: np.random.Generator) -> dict:
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(rng: np.random.Generator, st: dict) -> None:
    rng.bit_generator.state = st["numpy"]
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path, net, opt, state: dict, rng) -> None:
    """Atomic: model + optimiser + training state + RNG states."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "state": state, "rng": _rng_state(rng),
                "network": net.config.to_dict()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, net, opt, rng) -> dict:
    """Model, optimiser state, RNG states and the training state of ``path``. The optimiser's peak learning rates
    stay those of ``opt`` (the configuration given now), so a resumed run can change ``lr``."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    net.load_state_dict(ck["model"])
    bases = [g["base_lr"] for g in opt.param_groups]
    opt.load_state_dict(ck["optimizer"])
    for g, b in zip(opt.param_groups, bases):
        g["base_lr"] = b
    _set_rng_state(rng, ck["rng"])
    return ck["state"]


def init_weights(net, path, refiner: bool = False) -> None:
    """Load the weights of ``path`` (either layout, :func:`lib.weights.load_artefact`; with ``refiner``, its
    refiner's weights, as float32) into ``net``; parameters the file lacks (a head added since) keep their fresh
    initialisation, and a parameter whose shape differs is an error."""
    art = load_artefact(path)
    if refiner and art.refiner is None:
        raise SystemExit(f"--init {path}: init_refiner is set but these weights carry no refiner")
    sd = art.refiner_float32() if refiner else art.state_dict
    own = net.state_dict()
    bad = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise SystemExit(f"--init {path}: shapes differ for {bad[:5]}")
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if unexpected:
        raise SystemExit(f"--init {path}: unknown parameters {unexpected[:5]}")
    if missing:
        print(f"--init {path}: new parameters keep their initialisation: {missing}", flush=True)


def export_weights(net, path, meta: Optional[dict] = None) -> None:
    """One artefact (:func:`lib.weights.save_artefact`, loadable with ``torch.load(..., weights_only=True)``): the
    fp32 state_dict, ``meta`` (network config, contract, scores) and the label vocabulary, published atomically;
    ``<base>.json`` and ``<base>_labels.json`` beside it are human-readable copies."""
    sd = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in net.state_dict().items()}
    meta = dict(meta or {})
    meta.setdefault("network", net.config.to_dict())
    save_artefact(str(path), sd, meta, vocabulary=vocabulary())
