"""Multi-subject labelled sets committed to the repository, and their fixed subject splits.

One so far: ``sample-datasets/hippocampus`` (the Medical Segmentation Decathlon Task04 Hippocampus set, CC BY-SA
4.0; 168 T2w MR crops of as many subjects, labels 1 anterior and 2 posterior hippocampus; built by
``scripts/sample_data/hippocampus.py``, provenance in its ``README.md``). Its ``split.json`` divides the subjects
three ways, once and for all:

* ``train``: the ``hippocampus`` sample source of pretraining (``lib.training.data.sources.cohorts``);
* ``tune``: ``python -m lib.evaluation --split tune-hippocampus`` (settings may be decided here);
* ``loop``: the ``hippocampus`` family of the labelling-loop simulator (``lib.experiments.labelling_loop``); never
  trained or tuned on.

The structures are the two labelled parts and their union, ``hippocampus`` (label value :data:`UNION_VALUE` in
``dataset.json``'s ``labels``, defined by its ``unions``: an evaluator or a loader builds its mask as the union of
the parts; no label file holds that value)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

__all__ = ["REPO", "HIPPOCAMPUS_ROOT", "HIPPOCAMPUS_STRUCTURES", "UNION_VALUE", "SPLIT_NAMES", "subjects",
           "read_unions", "structure_mask"]

REPO = Path(__file__).resolve().parents[3]
HIPPOCAMPUS_ROOT = REPO / "sample-datasets" / "hippocampus"
UNION_VALUE = 3
HIPPOCAMPUS_STRUCTURES = {1: "hippocampus_anterior", 2: "hippocampus_posterior", UNION_VALUE: "hippocampus"}
SPLIT_NAMES = ("train", "tune", "loop")


def subjects(split: str, root=HIPPOCAMPUS_ROOT) -> List[str]:
    """The subject names (``hippocampus_NNN``, sorted) of one split of ``<root>/split.json``."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; choose from {SPLIT_NAMES}")
    path = Path(root) / "split.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (it is committed; rebuild it with "
                                f"scripts/sample_data/hippocampus.py)")
    names = json.loads(path.read_text())[split]
    if not names:
        raise ValueError(f"{path}: split {split!r} is empty")
    return sorted(names)


def read_unions(entry_or_meta: dict) -> Dict[int, Tuple[int, ...]]:
    """``{value: (member values)}`` from a ``dataset.json`` entry's (or the file's) ``unions`` (``{"3": [1, 2]}``)."""
    return {int(k): tuple(int(x) for x in v) for k, v in (entry_or_meta.get("unions") or {}).items()}


def structure_mask(labels: np.ndarray, value: int, unions: Dict[int, Tuple[int, ...]] = None) -> np.ndarray:
    """The binary mask of ``value`` in the label map: the union of its members when ``unions`` defines it."""
    members = (unions or {}).get(int(value))
    if members:
        return np.isin(labels, members)
    return labels == value
