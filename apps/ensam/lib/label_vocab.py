"""The label names ensam knows (concept prompts) and their learned token ids.

The vocabulary ``{name: token id}`` travels inside the weights artefact (``meta["vocabulary"]``, see
:mod:`lib.weights`, read through :func:`lib.weights.read_meta`; for the legacy layout, ``<weights>_labels.json``
beside the weights). ``model/ensam.pt`` (fine-tuning may add names) wins over ``model/pretrained_ensam.pt``;
without either, the built-in vocabulary of ``lib.labels`` is used. Token ids index ``NetworkConfig.num_labels``
learned label embeddings and never change.

Clients see token id + 1 as the voxel value of a name (1..N, stable across requests, < 256 so that OHIF's
uint8 NRRD holds it): ``/info`` lists ``{name: value}`` and a result's ``label_names`` lists the names it holds.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

from lib.io.atomic import atomic_write_json as _atomic_write_json
from lib.weights import read_meta as _read_weights_meta


def read_meta(weights_path: str) -> dict:
    """The meta of the weights (network, contract, vocabulary, scores): :func:`lib.weights.read_meta`."""
    return _read_weights_meta(weights_path)


def read_vocab(weights_path: str) -> Optional[Dict[str, int]]:
    """The vocabulary of the weights at ``weights_path``; None when they have none."""
    vocab = read_meta(weights_path).get("vocabulary")
    return dict(vocab) if vocab is not None else None


def atomic_write_json(obj, path: str) -> None:
    """Write JSON by temporary file + rename: a reader never sees half a file (:mod:`lib.io.atomic`)."""
    _atomic_write_json(obj, path, suffix=".tmp")


def builtin_vocab() -> Dict[str, int]:
    try:
        from lib.labels import vocabulary
    except ImportError:  # pragma: no cover - the vocabulary module ships with the app
        return {}
    return dict(vocabulary())


def load_vocab(weight_paths: Sequence[str], extra_names: Sequence[str] = (), num_labels: int = 128) -> Dict[str, int]:
    """Vocabulary of the newest weights that have one (last path first), else the built-in one; ``extra_names``
    (e.g. ``--conf labels``) are added with free token ids when missing."""
    vocab = None
    for w in reversed(list(weight_paths)):
        if not os.path.exists(w):
            continue
        try:
            vocab = read_vocab(w)
        except (OSError, ValueError):
            vocab = None
        if vocab:
            break
    vocab = vocab or builtin_vocab()
    return extend_vocab(vocab, [n for n in extra_names if n], num_labels) if extra_names else vocab


def extend_vocab(vocab: Dict[str, int], names: Sequence[str], num_labels: int = 128) -> Dict[str, int]:
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
    """name -> voxel value shown to clients (token id + 1), ordered by value."""
    return {n: v + 1 for n, v in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))}


def canonical(name: str, vocab: Dict[str, int]) -> str:
    """The vocabulary's spelling of ``name`` (case, spaces, dashes and known aliases tolerated); ``name``
    itself (stripped) when the vocabulary does not know it."""
    name = str(name).strip()
    if name in vocab:
        return name
    key = name.lower().replace(" ", "_").replace("-", "_")
    if key in vocab:
        return key
    try:
        from lib.labels import label_id, label_name

        idx = label_id(name)
        if idx is not None and label_name(idx) in vocab:
            return label_name(idx)
    except ImportError:  # pragma: no cover
        pass
    return name
