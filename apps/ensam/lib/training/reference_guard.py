"""A fine-tuning round never publishes weights that forget what the shipped weights knew (issue 29, item 2).

After a round the tuned weights are scored (box-prompted DSC on the model grid, :func:`lib.training.loop.evaluate`)
on a fixed set of structures of the labelled reference volumes (the atlases that ``ensam_seg`` and the atlas
rehearsal use: CT and MR, real labels; never the evaluation set), and so are the weights the round must not forget
(the shipped ones). When the tuned weights score more than ``tolerance`` below them, the published weights are a
blend ``base + alpha x (tuned - base)``, the largest ``alpha`` of :data:`ALPHAS` whose score is within the tolerance
(``alpha`` 0 is the base weights themselves, always within it). Interpolating between a fine-tuned network and its
starting point keeps most of the gain on the new task and most of the old behaviour (weight-space ensembles,
WiSE-FT: Wortsman et al., CVPR 2022).

Plain Python and torch, no server; :func:`lib.training.finetune.finetune` calls :func:`blend_within` after its
best-weights restore when it is given ``reference_volumes``.
"""

from __future__ import annotations

import copy
import time
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from .loop import LoopConfig, evaluate

__all__ = ["ALPHAS", "REFERENCE_CASES", "reference_cases", "blend_state", "blend_within"]

ALPHAS = (1.0, 0.75, 0.5, 0.25, 0.0)  # tried in this order: the most tuned blend that stays within the tolerance
REFERENCE_CASES = 32  # structures scored per blend: about 0.1 s each on one CPU thread (bf16)


def reference_cases(volumes: Sequence, cfg: LoopConfig, max_cases: int = REFERENCE_CASES, seed: int = 4321) -> list:
    """Box-prompted model-grid cases of at most ``max_cases`` structures of ``volumes`` (``D.Volume`` objects, e.g.
    :func:`lib.training.finetune.atlas_volumes`), taken in turn from each volume (so every volume, CT and MR,
    counts) in a ``seed``-shuffled order: the same cases for the same volumes and seed."""
    from .finetune import box_cases

    rng = np.random.default_rng(seed)
    per_volume = []
    for v in volumes:
        labels = sorted(v.bboxes)
        order = [labels[i] for i in rng.permutation(len(labels))]
        per_volume.append((v, order))
    picked: Dict[int, List[int]] = {i: [] for i in range(len(per_volume))}
    n, depth = 0, 0
    while n < max_cases and any(depth < len(o) for _, o in per_volume):
        for i, (_, order) in enumerate(per_volume):
            if depth < len(order) and n < max_cases:
                picked[i].append(order[depth])
                n += 1
        depth += 1
    out = []
    for i, (v, _) in enumerate(per_volume):
        if picked[i]:
            out.extend(box_cases([v], cfg, seed=seed + i, labels=picked[i]))
    return out


def blend_state(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float) -> dict:
    """``base + alpha x (tuned - base)`` for every floating tensor both hold with the same shape; ``tuned``'s own
    value elsewhere (a head or buffer the base lacks, integer buffers)."""
    out = {}
    for k, t in tuned.items():
        b = base.get(k)
        if b is not None and torch.is_floating_point(t) and tuple(b.shape) == tuple(t.shape):
            out[k] = torch.lerp(b.to(device=t.device, dtype=t.dtype), t, float(alpha))
        else:
            out[k] = t.clone()
    return out


def _box_dsc(network, cases, device, cfg, amp: bool = False) -> float:
    with torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16,
                        enabled=amp):
        return float(evaluate(network, cases, n_clicks=0, device=device, cfg=cfg)["val_box_dsc"])


def blend_within(network, base: Mapping[str, torch.Tensor], cases: Sequence, tolerance: float, device: str = "cpu",
                 cfg: Optional[LoopConfig] = None, alphas: Sequence[float] = ALPHAS, amp: bool = False) -> dict:
    """Load into ``network`` (holding the tuned weights) the blend toward ``base`` with the largest ``alphas`` entry
    whose box DSC on ``cases`` is at least the base's minus ``tolerance``; the base weights when none is (so the
    last entry should be 0); ``amp``: score in bf16 autocast (as the round trained). Returns {alpha, reference_base, reference_tuned, reference_after, cases, seconds}."""
    cfg = cfg or LoopConfig()
    t0 = time.time()
    tuned = copy.deepcopy(network.state_dict())
    network.load_state_dict(blend_state(base, tuned, 0.0))
    base_score = _box_dsc(network, cases, device, cfg, amp)
    chosen, chosen_score, tuned_score = 0.0, base_score, None
    for a in alphas:
        if a == 0.0:
            break
        network.load_state_dict(blend_state(base, tuned, a))
        s = _box_dsc(network, cases, device, cfg, amp)
        tuned_score = s if a == alphas[0] else tuned_score
        if s >= base_score - tolerance:
            chosen, chosen_score = a, s
            break
    network.load_state_dict(blend_state(base, tuned, chosen))
    return {"alpha": chosen, "tolerance": tolerance, "reference_base": round(base_score, 4),
            "reference_tuned": None if tuned_score is None else round(tuned_score, 4),
            "reference_after": round(chosen_score, 4), "cases": len(cases), "seconds": round(time.time() - t0, 1)}
