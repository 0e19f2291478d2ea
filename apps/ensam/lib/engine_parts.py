"""The engine's building blocks that hold no interactive state: loading a network (and its refiner) from weights,
whether bf16 pays on a device, an image's content key, and the bounded cache of encoder features."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import numpy as np
import torch

from .cache import ByteLRU
from .network import EnsamNet, NetworkConfig, build_network
from .weights import Artefact, load_artefact

__all__ = ["bf16_ok", "BF16_MODES", "use_bf16", "load_network", "load_refiner", "image_fingerprint", "EncodingCache"]


def bf16_ok(device) -> bool:
    """Whether bf16 autocast pays on ``device``: CUDA, or a CPU with bf16 units (AVX512-BF16 or AMX)."""
    if str(device).startswith("cuda"):
        return True
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


BF16_MODES = ("auto", "on", "off")  # the engine's ``bf16`` setting and the train task's ``bf16`` parameter


def use_bf16(mode: str, device) -> bool:
    """Whether to autocast to bf16 on ``device`` for ``mode``: "on", "off", or "auto" (where :func:`bf16_ok`);
    ValueError for any other mode."""
    if mode not in BF16_MODES:
        raise ValueError(f"bf16 must be 'auto', 'on' or 'off', not {mode!r}")
    return mode == "on" or (mode == "auto" and bf16_ok(device))


def load_network(weights: str | Artefact | None = None, config: NetworkConfig | dict | None = None,
                 device: str | torch.device = "cpu") -> EnsamNet:
    """Build the network (config from ``config``, else the weights' meta, else defaults) and load its weights.
    ``weights``: a path (read with :func:`lib.weights.load_artefact`, either layout) or an artefact already read."""
    art = load_artefact(weights) if isinstance(weights, (str, os.PathLike)) else weights
    if config is None and art is not None:
        config = art.network or {}
    net = build_network(config)
    if art is not None:
        net.load_state_dict(art.state_dict)
    return net.to(device).eval()


def load_refiner(art: Artefact | None, network: EnsamNet, device: str | torch.device = "cpu") -> EnsamNet | None:
    """The corrective steps' network of ``art`` (``art.refiner``: same network as ``network``, possibly stored in
    bf16, loaded as float32), or None when the artefact has none."""
    if art is None or art.refiner is None:
        return None
    net = build_network(replace(network.config, n_masks=1))  # the multi-mask head answers first clicks only
    net.load_state_dict(art.refiner_float32())
    return net.to(device).eval()


def image_fingerprint(image: np.ndarray, affine) -> str:
    """A cheap content key for an image: shape, dtype, affine and a strided sample of the voxels."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((image.shape, str(image.dtype))).encode())
    h.update(np.asarray(affine, dtype=np.float64).tobytes())
    step = [max(1, s // 64) for s in image.shape[:3]]
    h.update(np.ascontiguousarray(image[::step[0], ::step[1], ::step[2]]).tobytes())
    return h.hexdigest()


class EncodingCache(ByteLRU):
    """LRU of encoder features keyed by (image key, ROI, weights version, flip, encoded by the refiner), bounded in
    bytes. Thread-safe. A corrective step finds its session's encoding here by the ROI its previous step reported
    (:meth:`lib.engine.EnsamEngine._pick_roi`)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes=max_bytes, sizeof=lambda feats: sum(f.numel() * f.element_size() for f in feats))
        self.hits = 0
        self.misses = 0

    def get(self, key, default=None):
        with self._lock:
            v = super().get(key)
            if v is not None:
                self.hits += 1
            else:
                self.misses += 1
            return v if v is not None else default

    def put(self, key, feats) -> None:  # type: ignore[override]
        super().put(key, feats, replace=False)  # features of one key never change: the first stays
