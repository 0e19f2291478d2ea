"""The labelled cases of a MONAI Label datastore, as ``finetune`` takes them. No monailabel import: the datastore is
any object with monailabel's reading methods (``get_labeled_images``, ``get_label_uri``, ``get_image_uri``,
``get_label_info``).

* :func:`labelled_items`: every image with a ``final`` label, its label names read from the label info that
  Slicer/OHIF save (``label_info: [{"name": .., "idx": ..}]``) or from the vocabulary's known names;
* :func:`split_items`: a deterministic validation split;
* :func:`load_cases`: items -> ``{"image", "label", "affine", "name"}`` arrays, one voxel value per name.
"""

from __future__ import annotations

import logging
import random
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..label_vocab import canonical, output_ids
from ..io.volumes import load_volume

logger = logging.getLogger(__name__)

FINAL = "final"  # monailabel's DefaultLabelTag.FINAL: the labels a user saved as done

__all__ = ["FINAL", "label_names_of", "labelled_items", "split_items", "load_cases"]


def label_names_of(label_info: dict, fallback: Dict[int, str]) -> Dict[str, int]:
    """name -> voxel value of a saved label, from the info the clients store with it."""
    names: Dict[str, int] = {}
    for key in ("label_info", "labels"):
        items = label_info.get(key)
        if isinstance(items, list):
            for n, it in enumerate(items):
                if isinstance(it, dict) and it.get("name"):
                    v = it.get("idx", it.get("id", n + 1))
                    names[str(it["name"])] = int(v)
        elif isinstance(items, dict):
            names.update({str(k): int(v) for k, v in items.items()})
        if names:
            break
    if not names:
        ln = (label_info.get("params") or {}).get("label_names")
        if isinstance(ln, dict):
            names = {str(k): int(v) for k, v in ln.items()}
    if not names:
        names = {name: value for value, name in fallback.items()}
    return {k: v for k, v in names.items() if k.lower() != "background" and v > 0}


def labelled_items(datastore, vocab: Dict[str, int], wanted: Sequence[str], tag: str = FINAL) -> List[dict]:
    """Images with a ``tag`` label: ``{"id", "image", "label", "labels": {name (canonical): voxel value}}``, the
    names present in the label file (and in ``wanted`` when given)."""
    fallback = {v: k for k, v in output_ids(vocab).items()}
    items = []
    for image_id in sorted(datastore.get_labeled_images(tag)):
        label_uri = datastore.get_label_uri(image_id, tag)
        image_uri = datastore.get_image_uri(image_id)
        if not label_uri or not image_uri:
            continue
        info = datastore.get_label_info(image_id, tag) or {}
        names = {canonical(k, vocab): v for k, v in label_names_of(info, fallback).items()}
        present = set(np.unique(np.asarray(load_volume(label_uri).array)).tolist())
        names = {k: v for k, v in names.items() if v in present}
        if wanted:
            names = {k: v for k, v in names.items() if k in wanted}
        if not names:
            continue
        items.append({"id": image_id, "image": image_uri, "label": label_uri, "labels": names})
    return items


def split_items(items: List[dict], val_split: float, seed: int = 0) -> Tuple[List[dict], List[dict]]:
    """(train, validation): ``val_split`` of the items (at least one, never all), the same for the same ids."""
    items = sorted(items, key=lambda d: d["id"])
    if len(items) < 2 or val_split <= 0:
        return items, []
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    n_val = min(len(items) - 1, max(1, int(round(val_split * len(items)))))
    val_idx = set(order[:n_val])
    return [it for i, it in enumerate(items) if i not in val_idx], [it for i, it in enumerate(items) if i in val_idx]


def load_cases(items: List[dict], vocab: Dict[str, int]) -> List[dict]:
    """Items -> finetune cases. Each name gets the voxel value token id + 1 in every case, so the same structure has
    the same value whatever order the client saved its segments in."""
    cases = []
    for it in items:
        img = load_volume(it["image"])
        lab = load_volume(it["label"])
        if lab.shape != img.shape:
            raise ValueError(f"{it['id']}: label shape {lab.shape} differs from image shape {img.shape}")
        src = np.asarray(lab.array)
        out = np.zeros(src.shape, dtype=np.int16)
        for name, value in it["labels"].items():
            out[src == value] = vocab[name] + 1
        if not out.any():
            logger.warning(f"ensam train: {it['id']}: none of {sorted(it['labels'])} is present; skipped")
            continue
        cases.append({"image": np.asarray(img.array, dtype=np.float32), "label": out, "affine": img.affine,
                      "name": it["id"]})
    return cases
