"""Fine-tune a (pre-trained) ENSAM network on a user's labelled volumes with the pre-training loop.

Used by the MONAI Label train task; plain Python, no server dependency::

    from lib.training.finetune import finetune
    stats = finetune(net, cases, max_seconds=600, val_cases=val, device="cpu", label_ids={1: 5, 2: 0})

Each ``case`` is a dict ``{"image": (X, Y, Z) array, "label": (X, Y, Z) int array (0 = background, each other
value one structure), "affine": 4x4}`` (or a tuple ``(image, label, affine)``). Every step draws one structure
of one case, augments its region (spacing, flips, permutations, intensity), simulates a box (or a click) and
0..4 corrective clicks exactly as pre-training does, and takes one optimiser step (Muon + AdamW). With
``label_ids`` ({label value: vocabulary token id}) a fraction of the steps trains the prompt-free mode of those
labels. The network is updated in place; with ``val_cases`` it is validated periodically (box-only DSC and DSC
after 2 clicks) and, with ``keep_best``, the best weights (including the starting ones) are restored at the end.

Against forgetting (issue 29, item 2): ``anchor`` pulls the weights back toward ``anchor_weights`` after every step
(the train task passes the SHIPPED weights, so that rounds of fine-tuning do not drift away from them one after the
other), and ``rehearsal_atlases`` spends a fraction of the steps on the labelled structures of reference volumes
(:func:`atlas_volumes`: the atlases ``ensam_seg`` uses, CT and MR, real labels), so that a site's MR-only labels do
not make the network forget CT.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from ..contract import Contract, check_same, contract_for_network
from ..engine_parts import use_bf16
from . import data as D
from .distributed import Sync, average_gradients, broadcast_parameters
from .loop import LoopConfig, box_cases, concept_case, evaluate, prompted_case, train_step
from .optim import build_optimizer, lr_factor
from .pretrain_config import load_config_file
from .reference_guard import blend_within, reference_cases, reference_keys

logger = logging.getLogger(__name__)

__all__ = ["finetune", "as_volumes", "validation_cases", "atlas_volumes", "ATLAS_MAX_VOXELS",
           "ATLAS_VOLUME_VOXELS"]


def _unpack(case, i: int):
    if isinstance(case, Mapping):
        return case["image"], case["label"], case.get("affine", np.eye(4)), case.get("name", f"case{i}")
    image, label, affine = case[:3]
    return image, label, affine, f"case{i}"


def as_volumes(cases, label_ids: Optional[Mapping[int, int]] = None, seed: int = 0):
    """User cases -> training volumes (body mask, seeds, label boxes)."""
    rng = np.random.default_rng(seed)
    vols = []
    for i, c in enumerate(cases):
        image, label, affine, name = _unpack(c, i)
        image = np.asarray(image)
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        label = np.asarray(label)
        if label.ndim == 4 and label.shape[0] == 1:
            label = label[0]
        names = {int(v): f"label_{int(v)}" for v in np.unique(label) if v > 0}
        vols.append(D.make_volume(name, image, affine, label, names, rng=rng))
    return vols


# Rehearsal: the "segment anything" objects of pre-training (intensity-window components, synthetic blobs, tubes,
# shells, lesions) drawn on the user's own volumes, so that fine-tuning on a few named structures does not unlearn
# following any box or click (see the model card: without it, CT-only fine-tuning hurt the MR).
REHEARSAL_SOURCES = {"window": 0.4, "blob": 0.25, "tube": 0.1, "shell": 0.1, "lesion": 0.15}


def _sampler(vols, label_ids: Optional[Mapping[int, int]], rehearsal: float = 0.0):
    weights = {"real": 1.0 - rehearsal, **{k: rehearsal * w for k, w in REHEARSAL_SOURCES.items()}}
    s = D.ObjectSampler(vols, holdout=(), weights=weights)
    ids = {int(k): int(v) for k, v in (label_ids or {}).items()}
    s.structures = [(vi, lab, name, ids.get(lab, -1)) for vi, lab, name, _ in s.structures]
    return s


# Rehearsal on reference atlases: memory bound of the volumes held (image float32 + labels + body mask, about
# 7 bytes a voxel: 24 M voxels ~ 170 MB). An atlas above ATLAS_VOLUME_VOXELS is subsampled by an integer stride
# (the 512 x 512 x 133 chest CT at 2: 1.4 mm; the 1 mm brain MRs at 2), which every step resamples anyway.
ATLAS_MAX_VOXELS = 24e6
ATLAS_VOLUME_VOXELS = 6e6
# the atlas draws are weighted as the shipped main weights' recipe weighted its volumes (``volume_weights`` of
# recipe v12: brain parcellations, whose borders are not image edges, and the spine part maps damped, so about 60 %
# of the draws are CT structures); read from the recipe file itself, one place for the numbers
ATLAS_RECIPE = Path(__file__).with_name("pretrain_v12.yaml")


def atlas_volume_weights(recipe: Path = ATLAS_RECIPE) -> Dict[str, float]:
    """The ``volume_weights`` of the recipe file ``recipe`` (default: the shipped main weights' recipe, v12)."""
    return {str(k): float(v) for k, v in (load_config_file(str(recipe)).get("volume_weights") or {}).items()}


def atlas_volumes(folder: str, max_voxels: float = ATLAS_MAX_VOXELS, volume_voxels: float = ATLAS_VOLUME_VOXELS,
                  seed: int = 0, exclude: Sequence[str] = ()) -> List["D.Volume"]:
    """Training volumes of the labelled reference atlases in ``folder`` (a ``dataset.json`` folder, read as
    ``ensam_seg`` reads it: :meth:`lib.atlas.segment.AtlasLibrary.from_dataset`; ``exclude``: atlas keys left out),
    for ``finetune(rehearsal_atlases=...)``. Each is subsampled by an integer stride to at most ``volume_voxels``
    voxels; atlases are taken in a ``seed``-shuffled order while their voxels total at most ``max_voxels``. An
    evaluation folder is refused (ValueError), a missing folder gives []."""
    from ..atlas.segment import AtlasLibrary
    from ..io.volumes import load_volume
    from .data.volumes import _check_not_eval

    _check_not_eval(Path(folder))
    library = AtlasLibrary.from_dataset(folder, exclude=exclude)
    rng = np.random.default_rng(seed)
    out, total = [], 0
    for i in rng.permutation(len(library.atlases)):
        a = library.atlases[int(i)]
        for path in (a.image_path, a.label_path):
            _check_not_eval(Path(path))
        image = load_volume(a.image_path)  # the file's type (int16 for CT/MR): cast after subsampling
        shape = np.asarray(image.array.shape[:3])
        stride = max(1, math.ceil((float(np.prod(shape)) / volume_voxels) ** (1 / 3) - 1e-9))
        n = int(np.prod(-(-shape // stride)))
        if total + n > max_voxels:
            continue
        label = np.asarray(load_volume(a.label_path).array)
        if label.shape != image.array.shape:
            logger.warning(f"rehearsal atlas {a.key}: label shape {label.shape} != image {image.array.shape}; skipped")
            continue
        sub = (slice(None, None, stride),) * 3
        affine = np.asarray(image.affine, float) @ np.diag([stride, stride, stride, 1.0])
        out.append(D.make_volume(a.key, image.array[sub], affine, label[sub], {v: k for k, v in a.names.items()},
                                 a.modality, rng=rng))
        total += n
    return out


def _atlas_sampler(volumes, num_labels: int, exclude: Sequence = ()) -> "D.ObjectSampler":
    """The atlases' labelled structures, drawn as pre-training drew them (its validation structures left out, its
    volume weights); their built-in vocabulary ids (for prompt-free steps) only below the network's ``num_labels``;
    the (volume name, label value) pairs of ``exclude`` (the reference guard's structures) never drawn."""
    names = {v.name for v in volumes}
    s = D.ObjectSampler(volumes, holdout=D.DEFAULT_HOLDOUT, weights={"real": 1.0},
                        volume_weights={k: w for k, w in atlas_volume_weights().items() if k in names}, exclude=exclude)
    s.structures = [(vi, lab, name, vid if vid < num_labels else -1) for vi, lab, name, vid in s.structures]
    if not s.structures:
        raise ValueError("rehearsal_atlases: the rehearsal volumes hold no named labelled structure")
    return s


def _anchor_targets(network, anchor_weights: Optional[Mapping[str, torch.Tensor]]) -> List[torch.Tensor]:
    """Per parameter of ``network``, the weights the anchor pulls it toward: ``anchor_weights[name]`` (e.g. the
    shipped weights), or its starting value where ``anchor_weights`` is None or has no such name (a head the
    shipped network lacks). A shape that differs, or no name in common, is a ValueError."""
    out, matched = [], 0
    for name, p in network.named_parameters():
        t = None if anchor_weights is None else anchor_weights.get(name)
        if t is None:
            out.append(p.detach().clone())
            continue
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"anchor_weights[{name!r}] has shape {list(t.shape)}, the network's {list(p.shape)}")
        out.append(t.detach().to(device=p.device, dtype=p.dtype).clone())
        matched += 1
    if anchor_weights is not None and not matched:
        raise ValueError("anchor_weights share no parameter name with the network")
    return out


def validation_cases(cases, cfg: LoopConfig = LoopConfig(), seed: int = 1234):
    """Deterministic model-grid validation cases: one box-prompted case per structure of each case (no
    augmentation)."""
    return box_cases(as_volumes(cases), cfg, seed)


def _draw_from(sampler, rng, cfg: LoopConfig, concept: bool, tries: int, prompted_kind: str,
               concept_kind: str):
    """A training case from ``sampler`` (prompt-free at ``p_concept`` with ``concept``, else box / click
    prompted), or None when ``tries`` draws gave no usable sample."""
    for _ in range(tries):
        if concept and rng.random() < cfg.p_concept and any(s[3] >= 0 for s in sampler.structures):
            s, vid = sampler.concept_window(rng, window=cfg.contract.model_shape[0],
                                            spacing_mm=cfg.contract.label_spacing_mm)
            return concept_case(s.image, s.mask, vid, kind=concept_kind)
        s = sampler.sample(rng)
        case = prompted_case(s.image, s.mask, s.spacing, rng, cfg, kind=prompted_kind)
        if case is not None:
            return case
    return None


def _draw_case(sampler, rng, cfg: LoopConfig, concept: bool, tries: int = 100, atlases=None,
               p_atlas: float = 0.0):
    """One training case (never None: a data-parallel step must not be skipped on one rank only). With
    ``atlases`` (a sampler of reference volumes), a fraction ``p_atlas`` of the draws comes from them (kind
    ``atlas``), prompted or, with ``concept``, prompt-free at the same rate as the user's structures."""
    case = None
    if atlases is not None and p_atlas > 0 and rng.random() < p_atlas:
        case = _draw_from(atlases, rng, cfg, concept, tries, "atlas", "atlas")
    if case is None:
        case = _draw_from(sampler, rng, cfg, concept, tries, "finetune", "concept")
    if case is None:
        raise ValueError(f"finetune: no usable training sample in {tries} draws (structures too small?)")
    return case


def finetune(network, cases: Sequence, max_seconds: float, val_cases: Optional[Sequence] = None,
             device: str = "cpu", label_ids: Optional[Mapping[int, int]] = None, lr: float = 5e-4,
             optimizer: str = "muon", max_steps: int = 0, keep_best: bool = True, val_every: int = 0,
             seed: int = 0, loop: Optional[LoopConfig] = None, progress: Optional[Callable[[dict], None]] = None,
             should_stop: Optional[Callable[[], bool]] = None, rank: int = 0, world_size: int = 1,
             rehearsal: float = 0.3, contract: Optional[Contract] = None, anchor: float = 0.0,
             anchor_weights: Optional[Mapping[str, torch.Tensor]] = None, rehearsal_atlases: float = 0.0,
             rehearsal_volumes: Optional[Sequence] = None, bf16: str = "auto",
             reference_volumes: Optional[Sequence] = None, reference_tolerance: float = 1.0) -> Dict:
    """Fine-tune ``network`` in place for at most ``max_seconds`` (and ``max_steps`` if > 0).

    Args:
        network: an :class:`lib.network.EnsamNet` (its ``config.roi_size`` is the training grid).
        cases: labelled volumes, see the module docstring. val_cases: the same format (or None).
        device: 'cpu' / 'cuda' (bf16 autocast on CUDA). label_ids: {label value: token id} to also train the
            prompt-free mode for those labels (None = prompted training only).
        lr: AdamW learning rate (Muon: the same, with RMS matching). optimizer: 'muon' or 'adamw'.
        keep_best: with ``val_cases``, restore the weights with the best validation score at the end.
        val_every: validate every this many steps (0 = about 5 times in the budget: ``max_steps`` if given,
            else ``max_seconds``; every 50 steps when both are unbounded).
        progress: called with a dict (step, seconds, loss) after every step. should_stop: polled every step.
        rehearsal: fraction of the prompted steps spent on pre-training-style unnamed objects drawn on the same
            volumes (``REHEARSAL_SOURCES``), against forgetting; 0 = the labelled structures only.
        anchor: against forgetting, after every optimiser step the weights move this fraction of the way back to
            ``anchor_weights`` (a decoupled L2-SP pull, the same whatever the optimiser does to gradients; 0 = off).
        anchor_weights: {parameter name: tensor} the anchor pulls toward (the train task: the shipped weights,
            so that successive rounds do not drift); None = the starting weights. Names it lacks keep their
            starting values as targets; a shape that differs is a ValueError.
        rehearsal_atlases: fraction of ALL steps drawn from ``rehearsal_volumes`` (labelled reference volumes,
            :func:`atlas_volumes`) instead of the user's cases: their named structures, box / click prompted, or
            prompt-free at ``p_concept`` when ``label_ids`` trains that mode; 0 = off. In [0, 1).
        reference_volumes, reference_tolerance: against forgetting, with a tolerance below 1 the final weights are
            blended back toward ``anchor_weights`` (the starting weights without them) as far as needed for their
            box DSC on structures of these labelled reference volumes to stay within the tolerance of the base's
            (:func:`lib.training.reference_guard.blend_within`; ``stats["reference_guard"]``).
        contract: the training/inference contract of the weights being tuned (:func:`lib.contract.read_contract`;
            None = the defaults on the network's grid); the tuned weights keep it.
        rank, world_size: data-parallel training over ``world_size`` processes (``torch.distributed`` already
            initialised, see :mod:`lib.training.distributed`): every rank draws its own samples (give each its own
            ``seed``), gradients are averaged, all ranks stop at the same step; rank 0 alone validates and keeps
            the best weights (the other ranks' replicas are identical until that final restore).

    Returns:
        dict with steps, seconds, samples_per_s, loss_first / loss_last (EMA), val_before / val_after / val_best
        (dicts of val_box_dsc, val_click2_dsc, score), restored_best (bool), with reference volumes
        reference_guard (the blend chosen, the reference scores) and val_blended (the validation at that blend).
    """
    for key, value in (("rehearsal", rehearsal), ("anchor", anchor), ("rehearsal_atlases", rehearsal_atlases)):
        if not 0.0 <= value < 1.0:  # also refuses NaN
            raise ValueError(f"{key} must be in [0, 1), got {value}")
    if rehearsal_atlases > 0 and not rehearsal_volumes:
        raise ValueError("rehearsal_atlases > 0 needs rehearsal_volumes (labelled reference volumes)")
    rng = np.random.default_rng(seed)
    cfg = loop or LoopConfig(contract=contract_for_network(network.config, contract))
    if contract is not None:
        check_same(cfg.contract, contract, "the training loop", "the weights being tuned")
    if not label_ids:
        cfg = replace(cfg, p_concept=0.0)
    vols = as_volumes(cases, label_ids, seed)
    sampler = _sampler(vols, label_ids, rehearsal)
    if not sampler.structures:
        raise ValueError("finetune: no labelled structure in the cases")
    guarded = bool(reference_volumes) and reference_tolerance < 1.0
    ref_keys = reference_keys(reference_volumes) if guarded else []  # held out of the rehearsal on every rank
    atlases = _atlas_sampler(rehearsal_volumes, network.config.num_labels, exclude=ref_keys) \
        if rehearsal_atlases > 0 else None
    vcases = validation_cases(val_cases, cfg) if val_cases else []
    network.to(device)
    opt = build_optimizer(network, optimizer, lr=lr, muon_lr_scale=1.0)
    # bf16 autocast: "auto" on CUDA and on CPUs with bf16 units (about 2x faster steps); "on" / "off" force it
    amp = use_bf16(bf16, device)
    sync = Sync(world_size)
    grad_hook = None
    if sync.active:
        broadcast_parameters(network)
        grad_hook = lambda net: average_gradients(net.parameters(), world_size)  # noqa: E731
        if rank != 0:
            vcases = []  # rank 0 validates for everyone
    start = _anchor_targets(network, anchor_weights) if anchor > 0 else None
    guard_base = None
    if guarded and rank == 0:
        own = network.state_dict()
        guard_base = {k: (anchor_weights[k] if anchor_weights is not None and k in anchor_weights
                          and tuple(anchor_weights[k].shape) == tuple(v.shape) else v).detach().clone()
                      for k, v in own.items()}

    def score_now():
        s = evaluate(network, vcases, n_clicks=2, device=device, cfg=cfg)
        s["score"] = 0.5 * (s["val_box_dsc"] + s["val_click2_dsc"])
        return s

    stats = {"steps": 0, "seconds": 0.0, "loss_first": None, "loss_last": None, "restored_best": False,
             "atlas_steps": 0, "bf16": amp}
    best_sd, best = None, None
    if vcases:
        best = score_now()
        stats["val_before"] = dict(best)
        best_sd = copy.deepcopy(network.state_dict()) if keep_best else None
    t0 = time.time()
    ema = None
    est_steps = max_steps or None
    last_val_t = t0
    while True:
        elapsed = time.time() - t0
        stop = elapsed >= max_seconds or bool(max_steps and stats["steps"] >= max_steps)
        stop = stop or (should_stop is not None and should_stop())
        progress_frac = max(elapsed / max(max_seconds, 1e-6), stats["steps"] / est_steps if est_steps else 0.0)
        stop, progress_frac = sync.agree(stop, progress_frac)  # same stop step and lr on every rank
        if stop:
            break
        opt.set_lr_factor(lr_factor(stats["steps"], min(progress_frac, 1.0), warmup_steps=10, final=0.1))
        case = _draw_case(sampler, rng, cfg, bool(label_ids), atlases=atlases, p_atlas=rehearsal_atlases)
        stats["atlas_steps"] += case.kind == "atlas"
        loss, _ = train_step(network, opt, case, rng, cfg, device, amp, grad_hook=grad_hook)
        if start is not None:  # identical on every rank: their weights are identical
            with torch.no_grad():
                for p, p0 in zip(network.parameters(), start):
                    p.lerp_(p0, anchor)
        stats["steps"] += 1
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        if stats["loss_first"] is None:
            stats["loss_first"] = loss
        stats["loss_last"] = ema
        if progress is not None:
            progress({"step": stats["steps"], "seconds": time.time() - t0, "loss": ema})
        if val_every:
            due = stats["steps"] % val_every == 0
        elif max_steps:
            due = stats["steps"] % max(10, max_steps // 5) == 0
        elif np.isfinite(max_seconds):
            due = time.time() - last_val_t >= max_seconds / 5
        else:
            due = stats["steps"] % 50 == 0
        if vcases and due:
            last_val_t = time.time()
            s = score_now()
            if s["score"] > best["score"]:
                best = s
                best_sd = copy.deepcopy(network.state_dict()) if keep_best else None
    stats["seconds"] = time.time() - t0
    stats["samples_per_s"] = stats["steps"] / max(stats["seconds"], 1e-6)
    if vcases:
        final = score_now()
        stats["val_after"] = dict(final)
        if final["score"] >= best["score"]:
            best = final
        elif keep_best and best_sd is not None:
            network.load_state_dict(best_sd)
            stats["restored_best"] = True
        stats["val_best"] = dict(best)
    if guard_base is not None:
        rcases, groups = reference_cases(reference_volumes, cfg, ref_keys)
        if rcases:
            stats["reference_guard"] = blend_within(network, guard_base, rcases, groups, reference_tolerance, device,
                                                    cfg, amp=amp)
            if vcases and stats["reference_guard"]["alpha"] < 1.0:
                stats["val_blended"] = score_now()
    network.eval()
    return stats
