"""The model artefact: ONE ``.pt`` file holding the weights and everything that must travel with them.

Layout (``FORMAT``), one ``torch.save`` of plain containers, so ``torch.load(path, weights_only=True)`` reads it::

    {"format": "ensam-weights/1",
     "state_dict": {name: tensor},
     "meta": {"network": {...NetworkConfig...}, "contract": {...lib.contract...}, "vocabulary": {name: token id},
              ... scores, step, provenance ...},
     "refiner_state_dict": {name: tensor}}          # optional

``refiner_state_dict`` (optional): a second set of weights for the SAME network and contract, which the engine uses
for the steps that start from a previous mask (corrective clicks), while ``state_dict`` answers the first prompt
(a box, a lone click) and prompt-free segmentation (``lib.engine.EnsamEngine``). It may be stored in bf16 (the
engine computes in float32 either way). Readers that do not know it use ``state_dict`` for every step.

Writer: :func:`save_artefact` (pre-training's ``export_weights`` and the ``ensam`` train task). The file is written
beside its destination under a temporary name, flushed and fsync'ed, checked by loading it back, then published with
one ``os.replace`` (and the folder fsync'ed): a reader, or a process killed at any moment, sees either the old
artefact or the new one, whole. Afterwards ``<base>.json`` (meta without the vocabulary) and ``<base>_labels.json``
(the vocabulary) are written as human-readable COPIES; nothing reads them while the ``.pt`` carries its meta, so a
crash between the ``.pt`` and its copies cannot pair weights with another file's vocabulary or contract.

Reader: :func:`load_artefact` (weights + meta, for building a network) and :func:`read_meta` (meta only, cached by
the file's identity, for ``/info``, the vocabulary and the contract). Every reader of weights in the app goes
through them (``lib.engine.load_network``, ``lib.contract.read_contract``, ``lib.label_vocab``,
``lib.training.pretrain.init_weights``, the train task).

Legacy layout (releases 1-3 of ``model/pretrained_ensam.pt``; release 4 on is one artefact): the ``.pt`` is a plain
state_dict and the meta lives beside it in ``<base>.json`` (``network``, ``contract``, scores; an optional
``labels``) and ``<base>_labels.json`` (``{name: token id}``). It is still read, into the same :class:`Artefact`.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .io.atomic import atomic_write_json, fsync_dir, pid_alive

FORMAT = "ensam-weights/1"
FORMAT_FAMILY = "ensam-weights/"

__all__ = ["FORMAT", "Artefact", "WeightsError", "load_artefact", "read_meta", "save_artefact", "side_paths",
           "normalise_vocab", "combine_with_refiner", "average_weights"]


class WeightsError(ValueError):
    """A weights file that cannot be used (unreadable, not an ensam artefact nor a state_dict, newer format)."""


@dataclass
class Artefact:
    """What one weights file holds. ``layout``: ``"artefact"`` (one file) or ``"legacy"`` (state_dict + side
    JSON files). ``mtime`` / ``identity``: of the ``.pt`` file actually read (fstat of the open file), so a reader
    can tell later whether the file on disk is still the one it loaded."""

    path: str
    state_dict: Optional[Dict[str, Any]]
    meta: Dict[str, Any] = field(default_factory=dict)
    layout: str = "artefact"
    mtime: float = 0.0
    identity: tuple = ()
    refiner: Optional[Dict[str, Any]] = None  # weights for the corrective steps (same keys as state_dict), or None

    @property
    def mtime_ns(self) -> int:
        """Exact modification time (ns) of the file read; a float ``mtime`` loses the last digits."""
        return int(self.identity[3]) if len(self.identity) > 3 else int(round(self.mtime * 1e9))

    def refiner_float32(self) -> Optional[Dict[str, Any]]:
        """The refiner's weights with floating tensors as float32 (it may be stored in bf16), or None."""
        if self.refiner is None:
            return None
        return {k: v.float() if v.is_floating_point() else v for k, v in self.refiner.items()}

    @property
    def network(self) -> Optional[dict]:
        n = self.meta.get("network")
        return dict(n) if isinstance(n, dict) else None

    @property
    def contract(self) -> Optional[dict]:
        c = self.meta.get("contract")
        return c if c is not None else None

    @property
    def vocabulary(self) -> Optional[Dict[str, int]]:
        return self.meta.get("vocabulary")


def side_paths(path: str) -> tuple:
    """``(<base>.json, <base>_labels.json)``: the legacy meta files, and the human-readable copies."""
    base = os.path.splitext(str(path))[0]
    return base + ".json", base + "_labels.json"


def normalise_vocab(data: Any, where: str) -> Optional[Dict[str, int]]:
    """``{name: token id}`` from a dict or a list of names (index = id); None for None."""
    if data is None:
        return None
    if isinstance(data, list):
        data = {str(n): i for i, n in enumerate(data)}
    if not isinstance(data, dict):
        raise WeightsError(f"{where}: the label vocabulary must be an object name -> token id")
    try:
        return {str(k): int(v) for k, v in data.items()}
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{where}: the label vocabulary must map names to integer token ids ({e})") from None


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _legacy_meta(path: str) -> Dict[str, Any]:
    meta_path, vocab_path = side_paths(path)
    meta: Dict[str, Any] = {}
    try:
        if os.path.exists(meta_path):
            data = _read_json(meta_path)
            meta = dict(data) if isinstance(data, dict) else {}
        vocab = _read_json(vocab_path) if os.path.exists(vocab_path) else meta.get("labels")
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: its side file cannot be read: {e}") from None
    vocab = normalise_vocab(vocab, vocab_path if os.path.exists(vocab_path) else meta_path)
    if vocab is not None:
        meta["vocabulary"] = vocab
    return meta


def _is_state_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


HEAD_PREFIX = "mask_head."  # the multi-mask head (lib/network/mask_head.py): answers first prompts only


def _check_refiner(refiner: Any, state_dict: Dict[str, Any], where: str) -> None:
    """A refiner must be a state_dict with exactly the keys and shapes of the main weights (the same network),
    except the main weights' multi-mask head (``mask_head.*``), which answers lone first clicks only: a refiner
    never needs it."""
    if not _is_state_dict(refiner):
        raise WeightsError(f"{where}: 'refiner_state_dict' must be a state_dict (name -> tensor)")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIX)}
    refiner = {k: v for k, v in refiner.items() if not k.startswith(HEAD_PREFIX)}
    if set(refiner) != set(state_dict):
        diff = sorted(set(refiner) ^ set(state_dict))
        raise WeightsError(f"{where}: the refiner's weights are not those of the same network ({len(diff)} names "
                           f"differ, e.g. {diff[0]!r})")
    bad = [k for k, v in refiner.items() if tuple(v.shape) != tuple(state_dict[k].shape)]
    if bad:
        raise WeightsError(f"{where}: the refiner's {bad[0]!r} has shape {list(refiner[bad[0]].shape)}, the main "
                           f"weights' {list(state_dict[bad[0]].shape)}")


def _interpret(path: str, obj: Any, identity: tuple, mtime: float) -> Artefact:
    if isinstance(obj, dict) and isinstance(obj.get("format"), str):
        fmt = obj["format"]
        if fmt != FORMAT:
            newer = fmt.startswith(FORMAT_FAMILY)
            raise WeightsError(f"{path}: weights format {fmt!r} is not readable by this version (it reads {FORMAT!r}"
                               + ("; the file was written by a newer ensam" if newer else "") + ")")
        sd, meta = obj.get("state_dict"), obj.get("meta")
        if not _is_state_dict(sd) or not isinstance(meta, dict):
            raise WeightsError(f"{path}: a {FORMAT} file must hold 'state_dict' (name -> tensor) and 'meta' (object)")
        meta = dict(meta)
        if "vocabulary" in meta:
            meta["vocabulary"] = normalise_vocab(meta["vocabulary"], path)
        refiner = obj.get("refiner_state_dict")
        if refiner is not None:
            _check_refiner(refiner, sd, path)
        return Artefact(path, sd, meta, "artefact", mtime, identity, refiner)
    if _is_state_dict(obj):
        return Artefact(path, obj, _legacy_meta(path), "legacy", mtime, identity)
    raise WeightsError(f"{path}: neither an ensam weights artefact ({FORMAT}) nor a plain state_dict")


def load_artefact(path: str, map_location: Any = "cpu", _remember_meta: bool = True) -> Artefact:
    """Weights + meta of ``path`` (either layout), read with ``torch.load(..., weights_only=True)`` from ONE open
    file. Raises :class:`WeightsError` for a file that is not usable, FileNotFoundError when it does not exist."""
    import pickle
    import zipfile

    import torch

    path = os.fspath(path)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        try:
            obj = torch.load(f, map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as e:
            raise WeightsError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    art = _interpret(path, obj, _identity(st), st.st_mtime)
    if _remember_meta:
        _remember(art)
    return art


# ---- meta-only reads, cached by the identity of the files they came from --------------------------------------

_meta_cache: Dict[str, tuple] = {}
_meta_lock = threading.Lock()


def _stat_or_none(p: str) -> Optional[tuple]:
    try:
        return _identity(os.stat(p))
    except OSError:
        return None


def _cache_key(path: str, pt_identity: tuple, layout: str) -> tuple:
    # a legacy artefact's meta also depends on its side files
    return (pt_identity, tuple(_stat_or_none(p) for p in side_paths(path))) if layout == "legacy" else (pt_identity,)


def _remember(art: Artefact) -> None:
    with _meta_lock:
        _meta_cache[os.path.abspath(art.path)] = (art.layout, _cache_key(art.path, art.identity, art.layout),
                                                  art.meta)


def read_meta(path: str) -> Dict[str, Any]:
    """The meta of the weights at ``path`` (``network``, ``contract``, ``vocabulary``, scores, ...); ``{}`` when the
    file does not exist. Cheap when the files did not change since the last read (one or three ``stat``)."""
    path = os.fspath(path)
    ident = _stat_or_none(path)
    if ident is None:
        return {}
    with _meta_lock:
        hit = _meta_cache.get(os.path.abspath(path))
    if hit is not None and hit[1] == _cache_key(path, ident, hit[0]):
        return dict(hit[2])
    try:
        art = load_artefact(path)
    except FileNotFoundError:
        return {}
    return dict(art.meta)


# ---- the writer ------------------------------------------------------------------------------------------------

def _plain(meta: Dict[str, Any]) -> Dict[str, Any]:
    """Meta as JSON-able plain containers (what ``weights_only`` can load, and what the JSON copy shows)."""
    return json.loads(json.dumps(meta, default=str))


def _remove_stale_temps(d: str, name: str) -> None:
    """Temporary files of earlier writers of ``name`` that died before publishing (``.<name>.<pid>.<rand>.tmp``)."""
    prefix = f".{name}."
    for entry in os.listdir(d):
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        pid = entry[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or pid_alive(int(pid))):
            continue
        try:
            os.remove(os.path.join(d, entry))
        except OSError:
            pass


def _atomic_json(obj: Any, path: str) -> None:
    atomic_write_json(obj, path, suffix=".tmp")


def save_artefact(path: str, state_dict: Dict[str, Any], meta: Optional[Dict[str, Any]] = None,
                  vocabulary: Optional[Dict[str, int]] = None, copies: bool = True,
                  refiner: Optional[Dict[str, Any]] = None) -> str:
    """Publish ``state_dict`` + ``meta`` (+ ``vocabulary``, stored as ``meta["vocabulary"]``; + ``refiner``, the
    corrective steps' weights of the same network, see the module doc) at ``path`` atomically (see the module doc).
    ``copies``: also write the human-readable ``<base>.json`` / ``<base>_labels.json`` afterwards. Returns
    ``path``."""
    import torch

    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    os.makedirs(d, exist_ok=True)
    meta = _plain(dict(meta or {}))
    if vocabulary is not None:
        meta["vocabulary"] = vocabulary
    if meta.get("vocabulary") is not None:
        meta["vocabulary"] = dict(sorted(normalise_vocab(meta["vocabulary"], "vocabulary").items(),
                                         key=lambda kv: (kv[1], kv[0])))

    def tensors(d: Dict[str, Any], what: str) -> Dict[str, Any]:
        out = {}
        for k, v in d.items():
            if not isinstance(v, torch.Tensor):
                raise WeightsError(f"{what} entry {k!r} is a {type(v).__name__}, not a tensor")
            out[str(k)] = v.detach().cpu().contiguous().clone()
        return out

    sd = tensors(state_dict, "state_dict")
    obj = {"format": FORMAT, "state_dict": sd, "meta": meta}
    if refiner is not None:
        obj["refiner_state_dict"] = tensors(refiner, "refiner")
        _check_refiner(obj["refiner_state_dict"], sd, path)

    for n in (name, *map(os.path.basename, side_paths(path))):
        _remove_stale_temps(d, n)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        check = load_artefact(tmp, _remember_meta=False)  # what a reader will get: refuse to publish anything else
        if set(check.state_dict) != set(sd) or check.meta != meta or (check.refiner is None) != (refiner is None):
            raise WeightsError(f"{tmp}: the written artefact does not read back as written")
        os.replace(tmp, path)
        fsync_dir(d)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if copies:
        meta_copy, vocab_copy = side_paths(path)
        shown = {k: v for k, v in meta.items() if k != "vocabulary"}
        shown["_note"] = f"human-readable copy of the meta stored inside {name}; {name} is what ensam reads"
        _atomic_json(shown, meta_copy)
        if meta.get("vocabulary") is not None:
            _atomic_json(meta["vocabulary"], vocab_copy)
    return path


# ---- a main network and a refiner in one artefact --------------------------------------------------------------

def _same_network(a: Artefact, b: Artefact, where: str) -> None:
    """Refuse ``b`` unless it is ``a``'s network under ``a``'s contract (the multi-mask head aside)."""
    for what in ("network", "contract"):
        ours, theirs = a.meta.get(what), b.meta.get(what)
        if what == "network" and ours and theirs:  # the main weights' mask head is theirs alone
            ours, theirs = ({k: v for k, v in d.items() if k != "n_masks"} for d in (ours, theirs))
        if ours != theirs:
            raise WeightsError(f"{where}: its {what} differs from {a.path}'s: it must be the same network "
                               f"trained under the same contract")


def combine_with_refiner(main: str, refiner: str, out: str, dtype: str = "bfloat16",
                         note: Optional[Dict[str, Any]] = None, replace: bool = False,
                         meta_update: Optional[Dict[str, Any]] = None) -> str:
    """Publish at ``out`` the artefact ``main`` (its weights, meta and vocabulary) with the weights of ``refiner``
    as its corrective steps' network (stored as ``dtype``: "bfloat16" halves its size; "float32" keeps it). Both
    must be the same network under the same contract (refused otherwise). ``note`` is stored as ``meta["refiner"]``
    (provenance), with the refiner's own run, step and validation scores. ``main`` may already carry a refiner only
    with ``replace`` (a release that keeps the main weights and changes the refiner). ``meta_update``: top-level
    meta fields set as given (a release's number, date and evaluation figures). Returns ``out``."""
    import torch

    a, b = load_artefact(main), load_artefact(refiner)
    _same_network(a, b, refiner)
    if a.refiner is not None and not replace:
        raise WeightsError(f"{main} already carries a refiner (replace it with --replace)")
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    ref = {k: v.to(dt) if v.is_floating_point() else v for k, v in b.state_dict.items()
           if not k.startswith(HEAD_PREFIX)}
    meta = dict(a.meta)
    meta["refiner"] = {"from": os.path.basename(refiner), "dtype": dtype,
                       **{k: b.meta.get(k) for k in ("run", "step", "minutes_trained", "val_box_dsc",
                                                     "val_click2_dsc", "val_large_click2_dsc", "val_harmful",
                                                     "averaged_from")
                          if k in b.meta}, **(note or {})}
    meta.update(meta_update or {})
    return save_artefact(out, a.state_dict, meta, refiner=ref)


def average_weights(paths: list, out: str) -> str:
    """Publish at ``out`` the mean of the weights of ``paths`` (checkpoints of one run: the same network under the
    same contract, refused otherwise; integer tensors must agree), with the first one's meta, its ``step`` naming
    the steps averaged (``averaged_from``: each file, step and validation scores; the mean's own are unmeasured, so
    none is kept at the top). A mean of nearby checkpoints of one run is a cheap
    ensemble in one network (weight averaging). Main weights only: an input carrying a refiner is refused."""
    import torch

    if len(paths) < 2:
        raise WeightsError("averaging needs at least two checkpoints")
    arts = [load_artefact(p) for p in paths]
    for p, art in zip(paths, arts):
        _same_network(arts[0], art, p)
        if art.refiner is not None:
            raise WeightsError(f"{p} carries a refiner: average main weights (or refiners) one set at a time")
        if set(art.state_dict) != set(arts[0].state_dict):
            raise WeightsError(f"{p}: its weights are not those of {paths[0]}'s network")
    sd = {}
    for k, v in arts[0].state_dict.items():
        if v.is_floating_point():
            sd[k] = torch.stack([art.state_dict[k].float() for art in arts]).mean(0).to(v.dtype)
        elif all(torch.equal(art.state_dict[k], v) for art in arts):
            sd[k] = v
        else:
            raise WeightsError(f"{k!r} is an integer tensor that differs between the checkpoints")
    # the inputs' validation scores describe them, not their mean: kept per input under averaged_from
    meta = {k: v for k, v in arts[0].meta.items() if not k.startswith("val_")}
    meta["averaged_from"] = [{"from": os.path.basename(p), "step": art.meta.get("step"),
                              **{k: v for k, v in art.meta.items() if k.startswith("val_")}}
                             for p, art in zip(paths, arts)]
    meta["step"] = "mean of steps " + " + ".join(str(art.meta.get("step")) for art in arts)
    return save_artefact(out, sd, meta)


def _main(argv: Optional[list] = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lib.weights", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("combine", help="MAIN's artefact with REFINER's weights as its corrective steps' network")
    c.add_argument("main")
    c.add_argument("refiner")
    c.add_argument("out")
    c.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    c.add_argument("--note", default=None, help="JSON object stored in meta['refiner'] (provenance)")
    c.add_argument("--replace", action="store_true", help="MAIN may carry a refiner: it is replaced")
    c.add_argument("--meta", default=None, help="JSON file: top-level meta fields to set (release, evaluation)")
    v = sub.add_parser("average", help="the mean of several checkpoints of one run (same network)")
    v.add_argument("out")
    v.add_argument("inputs", nargs="+")
    a = p.parse_args(argv)
    if a.cmd == "average":
        out = average_weights(a.inputs, a.out)
    else:
        out = combine_with_refiner(a.main, a.refiner, a.out, a.dtype, json.loads(a.note) if a.note else None,
                                   replace=a.replace, meta_update=_read_json(a.meta) if a.meta else None)
    print(f"{out}: {os.path.getsize(out) / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    _main()
