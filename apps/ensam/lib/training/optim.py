"""Muon for the matrix-shaped weights, AdamW for the rest, and the learning-rate schedule.

``torch.optim.Muon`` accepts only 2-D parameters. Every hidden Conv3d / ConvTranspose3d / Linear weight gets a
2-D ``nn.Parameter`` *view* that shares storage with it (Conv3d (out, in, k, k, k) -> (out, in*k^3);
ConvTranspose3d (in, out, k, k, k) -> (in, out*k^3); Linear as is). Before each step the view's ``.grad`` is set
to the matching view of the real weight's gradient; Muon's in-place update of the view therefore updates the
conv weight itself. AdamW takes norms, biases, embeddings, learned tokens, the stem (input layer) and the
output head (decoder ``hyper`` last layer and ``bias`` conv).
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
from torch import nn

__all__ = ["MuonAdamW", "split_parameters", "build_optimizer", "lr_factor"]

# parameter-name fragments that always go to AdamW even if 2-D (input layer and output head)
ADAMW_ONLY = ("encoder.stem.", "decoder.hyper.2.", "decoder.bias.")


def split_parameters(model: nn.Module) -> Tuple[List[Tuple[str, nn.Parameter]], List[Tuple[str, nn.Parameter]]]:
    """(muon, adamw) lists of (name, parameter): muon = weights of Conv3d / ConvTranspose3d / Linear layers
    except the input and output layers; everything else (incl. embeddings) -> adamw."""
    muon, adamw = [], []
    matrix_weights = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear, nn.Conv1d, nn.Conv2d)):
            matrix_weights.add(f"{mname}.weight" if mname else "weight")
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in matrix_weights and p.ndim >= 2 and not any(name.startswith(x) for x in ADAMW_ONLY):
            muon.append((name, p))
        else:
            adamw.append((name, p))
    return muon, adamw


def _matrix_view(p: torch.Tensor, transposed: bool) -> torch.Tensor:
    if p.ndim == 2:
        return p.data
    return p.data.view(p.shape[0], -1)  # (out, in*k^3) for Conv; (in, out*k^3) for ConvTranspose


class MuonAdamW:
    """Two optimisers behind one interface (``step``, ``zero_grad``, ``state_dict``, ``param_groups``).

    Args:
        model: the network. lr: AdamW learning rate (Muon uses ``lr * muon_lr_scale`` with
        ``adjust_lr_fn='match_rms_adamw'``, so both see comparable update sizes). weight_decay: both.
        optimizer: 'muon' (default) or 'adamw' (everything to AdamW, the ablation).
    """

    def __init__(self, model: nn.Module, lr: float = 2e-3, weight_decay: float = 0.01,
                 betas=(0.9, 0.99), optimizer: str = "muon", muon_lr_scale: float = 1.0,
                 muon_momentum: float = 0.95) -> None:
        if optimizer not in ("muon", "adamw"):
            raise ValueError(f"optimizer must be 'muon' or 'adamw', not {optimizer!r}")
        self.kind = optimizer
        muon_params, adamw_params = split_parameters(model)
        if optimizer == "adamw":
            adamw_params = muon_params + adamw_params
            muon_params = []
        # the views Muon sees, and the real parameters they belong to
        self.pairs: List[Tuple[nn.Parameter, nn.Parameter]] = []
        self.muon_names = [n for n, _ in muon_params]
        for _, p in muon_params:
            v = nn.Parameter(_matrix_view(p, False), requires_grad=False)
            assert v.data_ptr() == p.data_ptr() and v.ndim == 2
            self.pairs.append((p, v))
        decay = [p for n, p in adamw_params if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in adamw_params if not (p.ndim >= 2 and "embed" not in n)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        self.adamw = torch.optim.AdamW(groups, lr=lr, betas=betas)
        self.muon = None
        if self.pairs:
            self.muon = torch.optim.Muon([v for _, v in self.pairs], lr=lr * muon_lr_scale,
                                         weight_decay=weight_decay, momentum=muon_momentum,
                                         adjust_lr_fn="match_rms_adamw")
        self.optimizers = [o for o in (self.adamw, self.muon) if o is not None]
        for o in self.optimizers:
            for g in o.param_groups:
                g["base_lr"] = g["lr"]

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def set_lr_factor(self, f: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * f

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        for p, v in self.pairs:
            p.grad = None
            v.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, v in self.pairs:
            v.grad = None if p.grad is None else p.grad.view(v.shape)
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> Dict:
        return {"kind": self.kind, "adamw": self.adamw.state_dict(),
                "muon": None if self.muon is None else self.muon.state_dict()}

    def load_state_dict(self, sd: Dict) -> None:
        if sd.get("kind", self.kind) != self.kind:
            raise ValueError(f"checkpoint optimiser {sd.get('kind')!r} != {self.kind!r}")
        self.adamw.load_state_dict(sd["adamw"])
        if self.muon is not None and sd.get("muon") is not None:
            self.muon.load_state_dict(sd["muon"])


def build_optimizer(model: nn.Module, optimizer: str = "muon", lr: float = 2e-3, weight_decay: float = 0.01,
                    **kw) -> MuonAdamW:
    return MuonAdamW(model, lr=lr, weight_decay=weight_decay, optimizer=optimizer, **kw)


def lr_factor(step: int, progress: float, warmup_steps: int = 40, final: float = 0.05) -> float:
    """Linear warm-up over ``warmup_steps`` steps, then cosine decay to ``final`` as ``progress`` (fraction of
    the time / step budget used, 0..1) goes to 1."""
    w = min(1.0, (step + 1) / max(1, warmup_steps))
    p = min(max(progress, 0.0), 1.0)
    return w * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p)))
