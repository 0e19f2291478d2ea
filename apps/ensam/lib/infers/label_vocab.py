"""The label names ensam knows (concept prompts) and their learned token ids.

The vocabulary lives in the JSON file beside the weights, ``<weights>.json`` = ``{"network": {...}, "labels":
{name: token id}}`` (the engine reads ``network`` from the same file): ``model/ensam.json`` (written by
fine-tuning, which may add new names) wins over ``model/pretrained_ensam.json`` (shipped with the pre-trained
weights). Token ids index ``NetworkConfig.num_labels`` learned label embeddings. The segmentation task shows
the names to clients as consecutive output values 1..N (what 3D Slicer's label import expects), in token order.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Optional, Sequence


def sidecar_path(weights_path: str) -> str:
    return os.path.splitext(weights_path)[0] + ".json"


def read_sidecar(weights_path: str) -> dict:
    p = sidecar_path(weights_path)
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def read_vocab(weights_path: str) -> Optional[Dict[str, int]]:
    """The ``labels`` of ``<weights>.json`` (None when absent)."""
    data = read_sidecar(weights_path).get("labels")
    if data is None:
        return None
    if isinstance(data, list):
        data = {str(n): i for i, n in enumerate(data)}
    if not isinstance(data, dict):
        raise ValueError(f"{sidecar_path(weights_path)}: 'labels' must map name -> token id")
    return {str(k): int(v) for k, v in data.items()}


def write_sidecar(weights_path: str, network: Optional[dict], vocab: Dict[str, int], **extra) -> None:
    """Atomic write (temporary file + rename) of ``<weights>.json``: a reader never sees half a file."""
    path = sidecar_path(weights_path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    data = dict(extra)
    if network:
        data["network"] = network
    data["labels"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    fd, tmp = tempfile.mkstemp(prefix=".sidecar_", suffix=".tmp", dir=d)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def load_vocab(weight_paths: Sequence[str], default: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Vocabulary of the newest weights that have one (last path first), else ``default``."""
    for w in reversed(list(weight_paths)):
        if not os.path.exists(w):
            continue
        try:
            v = read_vocab(w)
        except (OSError, ValueError):
            continue
        if v:
            return v
    return dict(default or {})


def extend_vocab(vocab: Dict[str, int], names: Sequence[str], num_labels: int) -> Dict[str, int]:
    """Add unknown names with the next free token ids; raises ValueError when the token table is full."""
    out = dict(vocab)
    used = set(out.values())
    nxt = 0
    for name in names:
        if name in out:
            continue
        while nxt in used:
            nxt += 1
        if nxt >= num_labels:
            raise ValueError(f"no free label token for {name!r}: all {num_labels} label tokens are in use")
        out[name] = nxt
        used.add(nxt)
    return out


def output_ids(vocab: Dict[str, int]) -> Dict[str, int]:
    """name -> output value 1..N, ordered by token id."""
    return {n: i + 1 for i, (n, _) in enumerate(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])))}
