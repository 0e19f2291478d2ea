"""The contract between training and inference: every number both sides must share, in ONE serialisable object.

A network learns under one ROI policy (margin, minimum size, aspect, the view around a lone click), one model
grid, one click-map width, one intensity normalisation and one working spacing for prompt-free windows; the
engine must use exactly the same ones. :class:`Contract` holds them. It is written into the weights' metadata
(``"contract"``, inside the one-file artefact of :mod:`lib.weights`) by every writer of weights (pre-training,
fine-tuning) and read back by every reader (the engine, fine-tuning, a resumed or initialised pre-training run)
through :func:`read_contract`. Nothing else
defines these numbers: :class:`lib.engine.EnsamEngine` and :class:`lib.training.loop.LoopConfig` take them from
the contract, and :func:`check_same` refuses a pairing that differs, naming every field that does.

Weights written before the contract existed (releases 1-3) read as :func:`legacy_contract`: the values the engine
used with them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from .geometry import RoiPolicy

__all__ = ["Contract", "ContractError", "INTENSITY_NORMALISATIONS", "legacy_contract", "read_contract",
           "check_same", "contract_for_network"]

# Intensity normalisations the code implements (geometry.normalize_intensity); the name is part of the contract.
INTENSITY_NORMALISATIONS = ("percentile_0.5_99.5",)


class ContractError(ValueError):
    """Training and inference (or two weights files) disagree on the contract, or a contract is malformed."""


@dataclass(frozen=True)
class Contract:
    """What the training loop and the engine must agree on.

    roi: how the region of interest is chosen around prompts (its ``model_shape`` is the model grid and must equal
    the network's ``roi_size``). click_sigma: width (model voxels) of the Gaussian click maps. intensity: the
    normalisation of a model-grid crop (a name in :data:`INTENSITY_NORMALISATIONS`). label_spacing_mm: isotropic
    working spacing of prompt-free label windows (training's concept windows and the engine's sliding window).
    refine: the network was trained on native-resolution refinement windows (the loop's ``p_refine`` > 0), so the
    engine may run its refinement stage; weights trained without them (releases 1-3) never do (on a thin tube,
    release 3 lost 0.02-0.06 DSC with the stage on).
    """

    roi: RoiPolicy = field(default_factory=RoiPolicy)
    click_sigma: float = 2.0
    intensity: str = "percentile_0.5_99.5"
    label_spacing_mm: float = 3.0
    refine: bool = False

    def __post_init__(self):
        if self.intensity not in INTENSITY_NORMALISATIONS:
            raise ContractError(f"unknown intensity normalisation {self.intensity!r}; this code implements "
                                f"{list(INTENSITY_NORMALISATIONS)}")
        if not (self.click_sigma > 0 and self.label_spacing_mm > 0 and self.roi.max_aspect >= 1
                and self.roi.click_extent_mm > 0 and self.roi.min_extent_mm > 0 and self.roi.margin >= 0):
            raise ContractError(f"contract values out of range: {self.to_dict()}")

    @property
    def model_shape(self) -> tuple:
        return tuple(int(s) for s in self.roi.model_shape)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["roi"]["model_shape"] = list(self.model_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Contract":
        """Strict: every field of the stored object must be known (a typo is an error, not a default)."""
        if not isinstance(d, dict):
            raise ContractError(f"a contract must be a JSON object, got {type(d).__name__}")
        top = {f.name for f in fields(cls)}
        unknown = set(d) - top
        if unknown:
            raise ContractError(f"unknown contract fields {sorted(unknown)}; known: {sorted(top)}")
        roi = d.get("roi", {})
        roi_names = {f.name for f in fields(RoiPolicy)}
        if not isinstance(roi, dict) or set(roi) - roi_names:
            raise ContractError(f"unknown contract roi fields {sorted(set(roi) - roi_names)}; known: "
                                f"{sorted(roi_names)}")
        roi = {k: (tuple(int(x) for x in v) if k == "model_shape" else float(v)) for k, v in roi.items()}
        return cls(roi=RoiPolicy(**roi), **{k: v for k, v in d.items() if k != "roi"})

    def with_overrides(self, overrides: Optional[dict]) -> "Contract":
        """This contract with some fields replaced (``{"roi": {"max_aspect": 4}, "click_sigma": 2.5}``)."""
        if not overrides:
            return self
        d = self.to_dict()
        for k, v in overrides.items():
            if k == "roi" and isinstance(v, dict):
                d["roi"].update(v)
            else:
                d[k] = v
        return Contract.from_dict(d)


def contract_for_network(network_config, contract: Optional[Contract] = None) -> Contract:
    """``contract`` (default: the defaults) on the network's model grid; an explicit grid that differs from the
    network's ``roi_size`` is an error."""
    shape = tuple(int(s) for s in (network_config.roi_size if hasattr(network_config, "roi_size")
                                   else network_config.get("roi_size", (64, 64, 64))))
    if contract is None:
        return Contract(roi=RoiPolicy(model_shape=shape))
    if contract.model_shape != shape:
        raise ContractError(f"the contract's model grid {list(contract.model_shape)} differs from the network's "
                            f"roi_size {list(shape)}")
    return contract


def legacy_contract(network_config=None) -> Contract:
    """Weights from before the contract (releases 1-3): the engine's values then (ROI aspect 4, 64 mm around a lone
    click, sigma 2, percentiles 0.5/99.5, 3 mm label windows), on the network's grid."""
    return contract_for_network(network_config or {}, None)


def read_contract(weights, network_config=None) -> Contract:
    """The contract of the weights ``weights`` (a path, or a :class:`lib.weights.Artefact` already read): the
    ``"contract"`` of their meta (:func:`lib.weights.read_meta`: inside the ``.pt``, or ``<weights>.json`` for the
    legacy layout), or :func:`legacy_contract` when the file or the key is absent. A malformed contract raises
    :class:`ContractError` naming the file."""
    from .weights import read_meta  # the one reader of weights files

    meta, where = {}, weights
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        meta, where = dict(weights.meta), weights.path
    elif weights:
        meta = read_meta(weights)
    if network_config is None:
        network_config = meta.get("network") or {}
    if "contract" not in meta:
        return legacy_contract(network_config)
    try:
        return contract_for_network(network_config, Contract.from_dict(meta["contract"]))
    except ContractError as e:
        raise ContractError(f"{where}: {e}") from None


def check_same(a: Contract, b: Contract, what_a: str, what_b: str) -> None:
    """Raise :class:`ContractError` naming every field where ``a`` and ``b`` differ."""
    da, db = a.to_dict(), b.to_dict()
    diffs = []
    for k in da:
        if k == "roi":
            diffs += [f"roi.{r}: {da['roi'][r]} vs {db['roi'][r]}" for r in da["roi"] if da["roi"][r] != db["roi"][r]]
        elif da[k] != db[k]:
            diffs.append(f"{k}: {da[k]} vs {db[k]}")
    if diffs:
        raise ContractError(f"{what_a} and {what_b} disagree on the training/inference contract ("
                            + "; ".join(diffs) + "): train again with the same contract, or use matching weights")

