"""What the active-learning scores are computed from: an image embedding and test-time-flip predictions.

* :func:`image_embedding`: the image's encoder features, globally average-pooled (one vector per scale,
  L2-normalised, concatenated). It needs no prompt.
* :func:`flip_predictions`: prompt-free predictions of one label name for the image as stored and mirrored along
  each axis (the mirrored prediction is flipped back), all on the original grid.
* :func:`disagreement`: 1 - mean pairwise Dice of such predictions (0 = all agree; nothing found anywhere = 1).
"""

from __future__ import annotations

import inspect
from typing import List, Sequence

import numpy as np


def _call(fn, *args, **kwargs):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


def image_embedding(engine, image: np.ndarray, affine: np.ndarray, image_key: str = "") -> np.ndarray:
    """Pooled encoder features of the whole image (float32 vector)."""
    feats = _call(engine.encode_features, image, affine=affine, image_key=image_key)
    if isinstance(feats, np.ndarray):
        return np.asarray(feats, dtype=np.float32).ravel()
    import torch

    if isinstance(feats, torch.Tensor):
        feats = [feats]
    parts: List[np.ndarray] = []
    for f in feats:
        f = f.detach().float()
        v = f.mean(dim=tuple(range(2, f.ndim))).reshape(-1) if f.ndim > 2 else f.reshape(-1)
        v = v.cpu().numpy()
        n = np.linalg.norm(v)
        parts.append(v / n if n > 0 else v)
    return np.concatenate(parts).astype(np.float32)


FLIPS: Sequence[tuple] = ((), (0,), (1,), (2,))


def flip_predictions(engine, image: np.ndarray, affine: np.ndarray, label_id: int, image_key: str = "",
                     flips: Sequence[tuple] = FLIPS) -> List[np.ndarray]:
    out = []
    for axes in flips:
        img = np.flip(image, axis=axes) if axes else image
        key = f"{image_key}|flip{''.join(map(str, axes))}" if image_key else ""
        m = _call(engine.segment_label, np.ascontiguousarray(img), affine, label_id, image_key=key)
        m = np.asarray(m) > 0
        out.append(np.flip(m, axis=axes) if axes else m)
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = int(a.sum()), int(b.sum())
    if sa + sb == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / (sa + sb)


def disagreement(masks: Sequence[np.ndarray], empty: float = 1.0) -> float:
    """1 - mean pairwise Dice. When every mask is empty the model found nothing at all for a structure it was
    asked about: that counts as ``empty`` (default 1.0, full uncertainty), not as perfect agreement."""
    if all(not np.any(m) for m in masks):
        return float(empty)
    if len(masks) < 2:
        return 0.0
    d = [dice(masks[i], masks[j]) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    return float(1.0 - np.mean(d))


def cosine_distance_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.clip(1.0 - an @ bn.T, 0.0, 2.0)
