"""What the active-learning scores are computed from: an image embedding and test-time-flip predictions.

* :func:`image_embedding`: the image's latent encoder features, globally average-pooled. It needs no prompt.
* :func:`flip_predictions`: prompt-free predictions of label names for the image as stored and mirrored along
  each axis (the mirrored prediction is flipped back), all on the original grid.
* :func:`disagreement`: 1 - mean pairwise Dice of such predictions (0 = all agree; nothing found anywhere = 1).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from ..evaluation.metrics import dice  # THE Dice


def image_embedding(engine, image: np.ndarray) -> np.ndarray:
    """Pooled encoder features of the whole image (float32 vector, :meth:`EnsamEngine.encode_features`)."""
    return np.asarray(engine.encode_features(image), dtype=np.float32).ravel()


FLIPS: Sequence[tuple] = ((), (0,), (1,), (2,))


def flip_predictions(engine, image: np.ndarray, affine: np.ndarray, label_ids: Sequence[int],
                     flips: Sequence[tuple] = FLIPS, spacing_mm=None) -> Dict[int, List[np.ndarray]]:
    """{label id: [bool mask on the original grid for each flip]}: every flipped copy is segmented once for all
    the labels (:meth:`EnsamEngine.segment_labels` encodes each window once, at ``spacing_mm``: None = the
    weights' contract) and the result flipped back."""
    out: Dict[int, List[np.ndarray]] = {int(i): [] for i in label_ids}
    for axes in flips:
        img = np.ascontiguousarray(np.flip(image, axis=axes)) if axes else image
        masks = engine.segment_labels(img, affine, list(out), spacing_mm=spacing_mm)
        for i in out:
            m = np.asarray(masks[i]) > 0
            out[i].append(np.flip(m, axis=axes) if axes else m)
    return out


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
