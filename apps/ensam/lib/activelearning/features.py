"""What the active-learning scores are computed from: an image embedding and test-time-flip predictions.

* :func:`image_embedding`: the image's latent encoder features, globally average-pooled. It needs no prompt.
* :func:`flip_predictions`: prompt-free predictions of label names for the image as stored and mirrored along
  each axis (the mirrored prediction is flipped back), all on the original grid.
* :func:`disagreement`: 1 - mean pairwise Dice of such predictions (0 = all agree; nothing found anywhere = 1).

What the predicted error of an answer by example (``ensam_seg``'s atlas routes) is made of, one helper per idea,
each 0 = no sign of error (:func:`predicted_error` combines them; issue 29):

* :func:`answer_atlas_disagreement`: 1 - mean Dice between the ANSWER and each registered atlas's mask (how far
  the answer is from the examples it was made from; the old score was the atlases' agreement among themselves);
* :func:`route_disagreement`: 1 - Dice between the fused atlas mask and the interactive engine's answer to the box
  and clicks derived from it (two independent answers, one from the registration, one from the image);
* :func:`volume_deviation`: ``|log(volume / geometric mean of the labelled examples' volumes)|`` (shape
  plausibility: an answer much larger or smaller than every labelled example is likely wrong);
* :func:`soft_disagreement`: 1 - soft Dice between the answer and the fused vote (the vote's own confidence);
* :func:`registration_mismatch`: ``exp(-MI)``, MI the mean mutual information of the registered atlases with the
  image (how badly the examples fit this image after registration).

The score is :data:`WEIGHTS`: the mean of ``answer_atlas`` and ``registration``, in [0, 1] (chosen on the
hippocampus TUNING subjects, 3 labelled, 9 unlabelled: Spearman rho with the error 0.68 for the pair, 0.43 / 0.47
for each alone, 0.33 for the volume, 0.22 for the old score; ``python -m lib.experiments.uncertainty_rank --cases
tune``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

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


def answer_atlas_disagreement(answer: np.ndarray, atlas_masks: Sequence[np.ndarray]) -> float:
    """1 - mean Dice between ``answer`` and each atlas's mask on the same grid (1.0 without atlases)."""
    if not len(atlas_masks):
        return 1.0
    return float(1.0 - np.mean([dice(answer, m) for m in atlas_masks]))


def route_disagreement(fused: np.ndarray, engine_answer: np.ndarray) -> float:
    """1 - Dice between the fused atlas mask and the engine's answer to prompts derived from it (both empty: 1.0,
    nothing was found)."""
    return disagreement([np.asarray(fused), np.asarray(engine_answer)], empty=1.0)


def volume_deviation(volume_mm3: float, reference_mm3: Sequence[float]) -> float:
    """``|log(volume / geometric mean of reference)|``: 0 when the answer is as large as the labelled examples on
    (geometric) average, log 2 = 0.69 when twice or half as large; an empty answer (or no reference) gives
    log 10 = 2.3, the deviation of a tenfold size error."""
    ref = np.asarray([float(v) for v in reference_mm3 if float(v) > 0], dtype=np.float64)
    if float(volume_mm3) <= 0 or not ref.size:
        return float(np.log(10.0))
    return float(abs(np.log(float(volume_mm3)) - np.mean(np.log(ref))))


def soft_disagreement(answer: np.ndarray, probability: np.ndarray) -> float:
    """1 - soft Dice ``2 sum(p * A) / (sum(p) + |A|)`` between the answer ``A`` and a vote ``p`` in [0, 1]."""
    a = np.asarray(answer, dtype=bool)
    p = np.clip(np.asarray(probability, dtype=np.float64), 0.0, 1.0)
    denom = float(p.sum()) + float(a.sum())
    if denom <= 0:
        return 1.0
    return float(1.0 - 2.0 * float(p[a].sum()) / denom)


def registration_mismatch(metrics: Sequence[float]) -> float:
    """``exp(mean(metric))`` over the registrations' final metrics (``Registration.metric``: SimpleITK's Mattes
    metric, minus the mutual information), i.e. ``exp(-mean MI)`` in (0, 1]: 1 when the atlases tell nothing
    about the image, lower the better they fit it (1.0 without registrations)."""
    if not len(metrics):
        return 1.0
    return float(np.exp(min(0.0, float(np.mean([float(m) for m in metrics])))))


# the features of the predicted error, and their weights in it (chosen on the hippocampus tuning subjects)
FEATURES = ("answer_atlas", "route", "volume", "soft", "registration")
WEIGHTS = {"answer_atlas": 1.0, "registration": 1.0}


def predicted_error(features: Dict[str, float], weights: Optional[Dict[str, float]] = None) -> float:
    """The weighted mean of the features named in ``weights`` (default :data:`WEIGHTS`); a missing one counts 1."""
    w = WEIGHTS if weights is None else weights
    total = float(sum(w.values()))
    return float(sum(v * float(features.get(k, 1.0)) for k, v in w.items()) / total) if total else 0.0


def label_volume_mm3(label_path: str, value: int) -> float:
    """Volume (mm^3) of ``value`` in a label file."""
    from lib.geometry import spacing_from_affine
    from lib.io.volumes import load_volume

    lab = load_volume(label_path)
    return float(np.count_nonzero(np.asarray(lab.array) == int(value))) * float(np.prod(spacing_from_affine(
        lab.affine)))


def atlas_answer_features(seg, image: np.ndarray, affine: np.ndarray, name: str, route: str, image_key: str,
                          reference_mm3: Optional[Sequence[float]] = None, log=None,
                          use_engine: Optional[bool] = None):
    """``(answer, features)`` of the answer by example ``ensam_seg`` gives for ``name`` on the image by ``route``
    (``atlas``: the fused mask; ``atlas+ensam``: the engine's answer to its prompts), with ``seg`` a
    :class:`lib.atlas.segment.SegmentByExample` set up as ``ensam_seg`` sets it up for the name's pool (atlases,
    fusion, an engine). The answer is a :class:`lib.atlas.segment.Structure` (None when no atlas puts the
    structure in the image: every feature is then 1). ``reference_mm3``: the labelled examples' volumes (None:
    the atlases' own, read from their label files). ``use_engine`` (default: when the route or :data:`WEIGHTS`
    needs the engine's answer): without it the ``route`` feature is left out."""
    from lib.atlas.registration import guess_modality
    from lib.geometry import spacing_from_affine

    quiet = log or (lambda m: None)
    if use_engine is None:
        use_engine = route != "atlas" or "route" in WEIGHTS
    res = seg.segment(image, affine, [name], image_key=image_key, log=quiet, use_engine=bool(use_engine))
    s = res.structures.get(name)
    if s is None:
        return None, {k: 1.0 for k in FEATURES}
    answer = s.atlas_crop if route == "atlas" else s.mask_crop
    atlases = [a for a in seg.select([name], guess_modality(np.asarray(image))) if name in a.names]
    regs = seg.registrations(image, affine, atlases, image_key, quiet)  # from seg's cache
    used = [a for a in atlases if a.key in regs]
    masks = [regs[a.key][1][s.region] == a.names[name] for a in used]
    if reference_mm3 is None:
        reference_mm3 = [label_volume_mm3(a.label_path, a.names[name]) for a in used]
    voxel_mm3 = float(np.prod(spacing_from_affine(affine)))
    feats = {
        "answer_atlas": answer_atlas_disagreement(answer, masks),
        "volume": volume_deviation(float(np.count_nonzero(answer)) * voxel_mm3, reference_mm3),
        "soft": soft_disagreement(answer, np.mean(masks, axis=0) if masks else np.zeros(answer.shape)),
        "registration": registration_mismatch([regs[a.key][0].metric for a in used]),
    }
    if s.source == "atlas+ensam":  # the engine answered: its agreement with the fused mask
        feats["route"] = route_disagreement(s.atlas_crop, s.mask_crop)
    return s, feats
