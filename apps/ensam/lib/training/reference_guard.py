"""A fine-tuning round never publishes weights that forget what the shipped weights knew (issue 29, item 2).

After a round the tuned weights are scored (box-prompted DSC on the model grid, :func:`lib.training.loop.evaluate`)
on a fixed set of structures of the labelled reference volumes (the atlases that ``ensam_seg`` uses: CT and MR, real
labels; never the evaluation set), and so are the weights the round must not forget (the shipped ones). The
structures are taken per modality and kept out of the atlas rehearsal (:func:`reference_keys`), so the score is a
held-out measure of forgetting, as the evaluation set's is. When the tuned weights' mean over a modality falls more
than ``tolerance`` below the base's, the published weights are a blend ``base + alpha x (tuned - base)``, the largest
``alpha`` of :data:`ALPHAS` whose every modality is within the tolerance (``alpha`` 0 is the base weights
themselves, always within it). Interpolating between a fine-tuned network and its
starting point keeps most of the gain on the new task and most of the old behaviour (weight-space ensembles,
WiSE-FT: Wortsman et al., CVPR 2022).

Plain Python and torch, no server; :func:`lib.training.finetune.finetune` calls :func:`blend_within` after its
best-weights restore when it is given ``reference_volumes``.
"""

from __future__ import annotations

import copy
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .loop import LoopConfig, box_cases, evaluate

__all__ = ["ALPHAS", "PER_MODALITY", "reference_keys", "reference_cases", "blend_state", "blend_within"]

ALPHAS = (1.0, 0.75, 0.5, 0.25, 0.0)  # tried in this order: the most tuned blend that stays within the tolerance
PER_MODALITY = 32  # structures scored per modality and blend: 0.29 s each on one CPU thread, 0.16 s on two (bf16)


def reference_keys(volumes: Sequence, per_modality: int = PER_MODALITY, seed: int = 4321) -> List[Tuple[str, int]]:
    """The (volume name, label value) of at most ``per_modality`` structures (and at most half) of each modality of
    ``volumes`` (``D.Volume`` objects, e.g. :func:`lib.training.finetune.atlas_volumes`), taken in turn from each
    volume of that modality in a ``seed``-shuffled order: the same structures for the same volumes and seed,
    whatever else the round does. Only label values with voxels count."""
    rng = np.random.default_rng(seed)
    by_modality: Dict[str, list] = {}
    for v in sorted(volumes, key=lambda v: v.name):
        labels = [lab for lab in sorted(v.bboxes) if v.labels is not None and (v.labels[v.bboxes[lab]] == lab).any()]
        order = [labels[i] for i in rng.permutation(len(labels))]
        by_modality.setdefault(v.modality or "?", []).append((v.name, order))
    out = []
    for modality in sorted(by_modality):
        queues, n, depth = by_modality[modality], 0, 0
        cap = min(per_modality, sum(len(q) for _, q in queues) // 2)  # at least half stay for the rehearsal
        while n < cap and any(depth < len(q) for _, q in queues):
            for name, q in queues:
                if depth < len(q) and n < cap:
                    out.append((name, int(q[depth])))
                    n += 1
            depth += 1
    return out


def reference_cases(volumes: Sequence, cfg: LoopConfig, keys: Sequence[Tuple[str, int]],
                    seed: int = 4321) -> Tuple[list, List[str]]:
    """(box-prompted model-grid cases of the structures ``keys`` of ``volumes``, the modality of each)."""
    cases, groups = [], []
    for i, v in enumerate(sorted(volumes, key=lambda v: v.name)):
        labels = [lab for name, lab in keys if name == v.name]
        if labels:
            got = box_cases([v], cfg, seed=seed + i, labels=labels)
            cases.extend(got)
            groups.extend([v.modality or "?"] * len(got))
    return cases, groups


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


def _box_dsc(network, cases, groups, device, cfg, amp: bool = False) -> Dict[str, float]:
    """Mean box DSC per group (modality) of ``cases``."""
    return {g: round(float(evaluate(network, [c for c, h in zip(cases, groups) if h == g], n_clicks=0, device=device,
                                    cfg=cfg, amp=amp)["val_box_dsc"]), 4) for g in sorted(set(groups))}


def blend_within(network, base: Mapping[str, torch.Tensor], cases: Sequence, groups: Sequence[str], tolerance: float,
                 device: str = "cpu", cfg: Optional[LoopConfig] = None, alphas: Sequence[float] = ALPHAS,
                 amp: bool = False) -> dict:
    """Load into ``network`` (holding the tuned weights) the blend toward ``base`` with the largest ``alphas`` entry
    whose mean box DSC on ``cases`` is, in every group of ``groups`` (one per case: the modality), at least the
    base's minus ``tolerance``; the base weights when none is (so the last entry should be 0); ``amp``: score in
    bf16 autocast (as the round trained). Returns {alpha, tolerance, reference_base, reference_tuned,
    reference_after (each {group: mean DSC}), cases, seconds}."""
    cfg = cfg or LoopConfig()
    t0 = time.time()
    tuned = copy.deepcopy(network.state_dict())
    network.load_state_dict(blend_state(base, tuned, 0.0))
    base_score = _box_dsc(network, cases, groups, device, cfg, amp)
    chosen, chosen_score, tuned_score = 0.0, base_score, None
    for a in alphas:
        if a == 0.0:
            break
        network.load_state_dict(blend_state(base, tuned, a))
        s = _box_dsc(network, cases, groups, device, cfg, amp)
        tuned_score = s if a == alphas[0] else tuned_score
        if all(s[g] >= base_score[g] - tolerance for g in base_score):
            chosen, chosen_score = a, s
            break
    network.load_state_dict(blend_state(base, tuned, chosen))
    return {"alpha": chosen, "tolerance": tolerance, "reference_base": base_score, "reference_tuned": tuned_score,
            "reference_after": chosen_score, "cases": len(cases), "seconds": round(time.time() - t0, 1)}
