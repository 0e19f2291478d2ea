"""``ensam_seg``: automatic segmentation of label names, by example (atlases + ensam) or by learned label token.

Every name the vocabulary knows gets a ROUTE with a validation score:

* ``atlas+ensam``: the labelled images that carry the name (the reference atlases shipped with the app, i.e. the
  training volumes of ``make data``, plus the datastore's ``final`` labels) are registered onto the image, fused,
  and turned into a box and clicks for the interactive model (:mod:`lib.atlas`). Its validation score is the
  leave-one-out DSC on the training atlases (``model/atlas_validation.json``, written by
  ``python -m lib.atlas.evaluate --data sample-datasets/train --atlases sample-datasets/train
  --validation apps/ensam/model/atlas_validation.json``).
* ``atlas``: the fused atlas mask itself, for names where it validates better than ensam's boundary (same
  leave-one-out file).
* ``token``: the learned label token (prompt-free), scored by the weights' own validation (``val_concept_dsc``,
  per name when the weights carry ``val_concept_dsc_per_label``).

A name that the datastore's ``final`` labels carry (a site's own structure) also gets the atlas routes with the
DATASTORE's labels as the atlas pool: its validation is the leave-one-out over those labels (each labelled scan
segmented from up to ``VALIDATION_ATLASES`` of the others: the fused mask for ``atlas``, ensam from its prompts for
``atlas+ensam``), computed at the first request for the name after a label is saved or the weights change, and
kept. The request then registers up to ``DATASTORE_ATLASES`` of them onto the image, so every labelled scan adds
an atlas up to that count. With one labelled scan (nothing to leave one out) or before the first leave-one-out,
the ``atlas`` route is offered PROVISIONALLY (``validation`` null) unless the token is validated for that very name
(per-name ``val_concept_dsc_per_label``) at or above the floor: on the hippocampus tuning subjects one datastore
atlas gives DSC 0.78 (eight: 0.85) where the token gives 0.21 (``python -m lib.experiments.datastore_atlases``).

The better route of a name is used; a name whose best route is below ``floor`` (``--conf seg_floor``, default
0.35) is not offered: ``/info`` lists it under ``not_offered`` with the reason, and a request for it is a 422 that
says why. ``/info`` -> ``models.ensam_seg.routes`` lists, per offered name, its route and validation score.

The answer's ``structures`` gives, per name, the route, the atlases used, their agreement and the uncertainty
(1 - mean pairwise Dice of the atlases' masks and ensam's mask): the per-structure confidence that the
``uncertainty`` active-learning score uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.others.generic import device_list

from lib.atlas.segment import Atlas, AtlasLibrary, SegmentByExample, best_route, canonical_name

from .engine_provider import EngineProvider, resolve_device
from .ensam_infer import _jsonable, _names, _result_format
from ..io.imageio import VolumeCache, write_mask
from ..label_vocab import canonical, load_vocab, output_ids, read_meta
from lib.request_parsing import RequestError, first_value

logger = logging.getLogger(__name__)

ATLAS_ROUTES = ("atlas+ensam", "atlas")  # ensam from the atlases' prompts / the fused atlas mask itself
FLOOR = 0.35  # validation DSC a route must reach for its name to be offered
DATASTORE_ATLASES = 8  # datastore atlases registered per request (hippocampus tuning: DSC still rising at 8)
VALIDATION_ATLASES = 3  # atlases per left-out scan in the datastore leave-one-out
DATASTORE_FUSION = {"fusion": "local", "fusion_power": 3.0}
DEFAULT_LABELS = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta", "autochthon_left",
                  "autochthon_right")


def read_validation(path: str) -> Dict[str, Dict[str, float]]:
    """name -> {"atlas+ensam": DSC, "atlas": DSC}: leave-one-out validation of the atlas routes on the training
    atlases ({} when the file is missing)."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return {canonical_name(k): {m: float(x) for m, x in v.items() if m in ATLAS_ROUTES}
            for k, v in (data.get("validation") or {}).items()}


class LockedEngine:
    """The engine, holding the device lock only for each ensam call (registration runs without it, so
    interactive clicks are not held up for the whole segmentation)."""

    def __init__(self, engine, lock):
        self.engine, self.lock = engine, lock

    def segment_step(self, *args, **kwargs):
        with self.lock:
            return self.engine.segment_step(*args, **kwargs)


class EnsamSegByExample(InferTask):
    def __init__(self, provider: EngineProvider, volumes: VolumeCache, atlas_folder: str, validation_file: str,
                 extra_names: Sequence[str] = (), default_labels: Sequence[str] = (), num_labels: int = 128,
                 floor: float = FLOOR, threads: int = 0,
                 description: str = "ENSAM automatic segmentation by example (atlases -> box + clicks -> ensam) "
                                    "or by learned label token, per name (see 'routes')"):
        self.provider = provider
        self.volumes = volumes
        self.extra_names = list(extra_names)
        self.num_labels = int(num_labels)
        self.floor = float(floor)
        self.threads = int(threads)
        self.library = AtlasLibrary.from_dataset(atlas_folder)
        self.validation_file = validation_file
        self.seg = SegmentByExample(self.library)
        # the datastore's atlases: their own registration caches (requests; leave-one-out, one entry per scan)
        # (fused by votes weighted per voxel by local intensity similarity, power 3: hippocampus tuning subjects,
        # leave-one-out, DSC 0.834 (majority) -> 0.850 with 8 atlases; lib.experiments.datastore_atlases)
        self.ds_seg = SegmentByExample(self.library.subset([]), max_atlases=DATASTORE_ATLASES, **DATASTORE_FUSION)
        self.val_seg = SegmentByExample(self.library.subset([]), cache_images=32, **DATASTORE_FUSION)
        self._val_cache: Dict[tuple, Dict[str, float]] = {}  # (left-out scan, others, weights) -> route DSCs
        self._val_lock = threading.Lock()
        self._ds_seg_lock = threading.Lock()
        self.datastore: Optional[Callable[[], Any]] = None
        self._ds_lock = threading.Lock()
        self._present_cache: Dict[str, tuple] = {}  # label path -> (file key, {name: value} held)
        routes, _ = self.routes()
        defaults = [canonical_name(n) for n in (default_labels or DEFAULT_LABELS)]
        self.default_labels = [n for n in defaults if n in routes] or sorted(routes)[:8]
        super().__init__(type=InferType.SEGMENTATION, labels=self._labels(routes), dimension=3,
                         description=description,
                         config={"device": device_list(), "labels": ",".join(self.default_labels)})

    # ---- routes -------------------------------------------------------------------------------------------
    def vocab(self) -> Dict[str, int]:
        return load_vocab(self.provider.paths, self.extra_names, self.num_labels)

    def _token_scores(self) -> Tuple[Dict[str, float], Optional[float]]:
        # the newest weights that carry a concept validation: a fine-tuned ensam.pt validated on clicks and boxes
        # only keeps the label tokens it started from, so the pre-trained file's figures still describe them
        meta: dict = {}
        for path in reversed(self.provider.existing_paths()):
            meta = read_meta(path)
            if meta.get("val_concept_dsc") is not None or meta.get("val_concept_dsc_per_label"):
                break
        per = {canonical_name(k): float(v) for k, v in (meta.get("val_concept_dsc_per_label") or {}).items()}
        overall = meta.get("val_concept_dsc")
        return per, None if overall is None else float(overall)

    def routes(self, validate: Sequence[str] = (), engine=None) -> Tuple[Dict[str, dict], Dict[str, str]]:
        """({offered name: {"route", "validation", "atlases"[, "pool", "provisional"]}}, {not offered name: why}).

        ``validate``: names whose datastore leave-one-out is computed now when it is not known (with ``engine``
        for the ``atlas+ensam`` route); for the other names only what is known counts."""
        vocab = self.vocab()
        atlas_val = read_validation(self.validation_file)
        self.datastore_atlases()
        carriers = {n: [k for k in keys if not k.startswith("datastore:")]  # the reference atlases
                    for n, keys in self.library.names().items()}
        ds_carriers = self._datastore_carriers()
        tok_per, tok_all = self._token_scores()
        offered: Dict[str, dict] = {}
        refused: Dict[str, str] = {}
        for name in vocab:
            cands: Dict[str, float] = {}
            pool: Dict[str, str] = {}
            if carriers.get(name):
                cands.update({m: atlas_val[name][m] for m in ATLAS_ROUTES if m in atlas_val.get(name, {})})
                pool.update({m: "reference" for m in cands})
            ds = ds_carriers.get(name, [])
            ds_val = self.datastore_validation(name, ds, compute=name in validate, engine=engine) if ds else None
            for m, v in (ds_val or {}).items():
                if m in ATLAS_ROUTES and v > cands.get(m, -1.0):
                    cands[m], pool[m] = v, "datastore"
            tok = tok_per.get(name, tok_all)
            if tok is not None:
                cands["token"] = tok
            best = best_route(cands, self.floor)
            if ds and ds_val is None and (best is None or best == "token") and "reference" not in pool.values() \
                    and (name not in tok_per or tok_per[name] < self.floor):
                # one labelled scan, or its leave-one-out not computed yet: the site's own label beats a token
                # that was never validated on this name (measured on the hippocampus tuning subjects)
                offered[name] = {"route": "atlas", "validation": None, "atlases": len(ds), "pool": "datastore",
                                 "provisional": ("one labelled scan: no leave-one-out yet" if len(ds) < 2 else
                                                 "leave-one-out over the datastore's labels runs at the next "
                                                 "request for this name")}
                continue
            if best is not None:
                p = pool.get(best)
                offered[name] = {"route": best, "validation": round(cands[best], 4),
                                 "atlases": len(ds) if p == "datastore" else len(carriers.get(name, []))}
                if p == "datastore":
                    offered[name]["pool"] = "datastore"
                continue
            parts = [f"{r} route validation DSC {v:.2f}" + (" (datastore leave-one-out)" if pool.get(r) ==
                                                             "datastore" else "") for r, v in cands.items()]
            if carriers.get(name) and not atlas_val.get(name):
                parts.append(f"{len(carriers[name])} atlas(es) carry it but it has no leave-one-out validation")
            elif not carriers.get(name) and not ds:
                parts.append("no atlas carries it")
            refused[name] = f"{'; '.join(parts)}: below the floor {self.floor:.2f}"
        return offered, refused

    def _datastore_carriers(self) -> Dict[str, List[Atlas]]:
        """name -> the datastore's atlases that carry it (sorted by key)."""
        out: Dict[str, List[Atlas]] = {}
        for a in sorted((a for a in self.library.atlases if a.source == "datastore"), key=lambda a: a.key):
            for n in a.names:
                out.setdefault(n, []).append(a)
        return out

    def datastore_validation(self, name: str, atlases: Sequence[Atlas], compute: bool = False,
                             engine=None) -> Optional[Dict[str, float]]:
        """Leave-one-out DSC of the routes by the datastore's atlases of ``name``: {"atlas": mean DSC of the fused
        mask, "atlas+ensam": mean DSC of ensam from its prompts (with ``engine`` only)}, each labelled scan
        segmented from up to ``VALIDATION_ATLASES`` of the others; None with fewer than two scans, or when some
        scan's figure is not known and ``compute`` is false."""
        from lib.evaluation.metrics import dice

        from ..io.imageio import file_key, load_volume

        if len(atlases) < 2:
            return None
        weights = self.provider.weights_info(getattr(engine, "engine", engine)) if engine is not None else {}
        stamp = (weights.get("weights"), weights.get("weights_mtime_ns"))
        got: List[Dict[str, float]] = []
        for i, a in enumerate(atlases):
            others = [o for o in atlases if o.key != a.key][:VALIDATION_ATLASES]
            try:
                key = (name, a.key, file_key(a.label_path), tuple((o.key, file_key(o.label_path)) for o in others))
            except OSError:  # a label removed meanwhile
                continue
            hit = self._val_cache.get(key)
            if hit is not None and (not compute or engine is None or hit.get("_weights") == stamp):
                got.append(hit)  # without a new computation, the last known figures (for ensam: older weights')
                continue
            if not compute:
                return None
            with self._val_lock:  # one computation at a time (val_seg's library is swapped per scan)
                vol = load_volume(a.image_path)
                ref = np.asarray(load_volume(a.label_path).array) == a.names[name]
                self.val_seg.library = self.library.subset(others)
                self.val_seg.max_atlases = len(others)
                self.val_seg.engine = engine
                image_key = f"{a.key}@{key[2]}"
                res = self.val_seg.segment(vol.array, vol.affine, [name], image_key=image_key,
                                           log=lambda m: logger.debug(f"ensam_seg validation: {m}"),
                                           use_engine=engine is not None)
                if vol.array.size > 4_000_000:  # keep registrations (label maps) of small scans only
                    self.val_seg._cache.pop(image_key)
            s = res.structures.get(name)
            row: Dict[str, Any] = {"atlas": dice(s.atlas_mask, ref) if s else 0.0}
            if engine is not None:
                row.update({"atlas+ensam": dice(s.mask, ref) if s else 0.0, "_weights": stamp})
            self._val_cache[key] = row
            got.append(row)
            logger.info(f"ensam_seg: leave-one-out of {name!r} {i + 1}/{len(atlases)} ({a.key}): "
                        + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if not k.startswith("_")))
        if len(got) < 2:
            return None
        return {m: float(np.mean([g[m] for g in got])) for m in ATLAS_ROUTES if all(m in g for g in got)}

    def _labels(self, routes: Dict[str, dict]) -> Dict[str, int]:
        ids = output_ids(self.vocab())
        return {n: v for n, v in ids.items() if n in routes}

    def info(self) -> Dict[str, Any]:
        routes, refused = self.routes()
        self.labels = self._labels(routes)
        out = super().info()
        out["routes"] = routes
        out["not_offered"] = refused
        out["floor"] = self.floor
        return out

    def is_valid(self) -> bool:
        return True  # the network can always be built; a name without a route is refused per request (422)

    def get_path(self, validate=True):
        p = self.provider.weights_path()
        return p if p or not validate else None

    # ---- datastore atlases --------------------------------------------------------------------------------
    def datastore_atlases(self) -> int:
        """Add the datastore's ``final`` labels (with known label names) to the atlas library; returns how many
        the library holds from the datastore."""
        ds = self.datastore() if self.datastore else None
        if ds is None:
            return 0
        vocab = self.vocab()
        values = output_ids(vocab)
        with self._ds_lock:
            for image_id in ds.get_labeled_images("final"):
                try:
                    label_id = ds.get_label_by_image_id(image_id, "final")
                    info = ds.get_label_info(label_id, "final") or {}
                    label_uri = ds.get_label_uri(label_id, "final")
                    names = _label_names(info) or self._present(label_uri, values)
                    atlas = Atlas(f"datastore:{image_id}", ds.get_image_uri(image_id), label_uri,
                                  {canonical(n, vocab): int(v) for n, v in names.items()}, "", "datastore")
                except Exception as e:  # noqa: BLE001 - one unreadable label must not stop segmentation
                    logger.warning(f"ensam_seg: datastore label of {image_id} not usable as an atlas: {e}")
                    continue
                known = {a.key: a for a in self.library.atlases}
                old = known.get(atlas.key)
                if old is None or old.label_path != atlas.label_path or old.names != atlas.names:
                    self.library.add(atlas)
            return sum(a.source == "datastore" for a in self.library.atlases)

    def _present(self, label_path: str, values: Dict[str, int]) -> Dict[str, int]:
        """A label without saved names is read as ensam's own answers are written (value = token id + 1): the
        names whose values it holds (read once per file version)."""
        from ..io.imageio import file_key, load_volume

        key = file_key(label_path)
        hit = self._present_cache.get(label_path)
        if hit is None or hit[0] != key:
            held = set(np.unique(np.asarray(load_volume(label_path).array)).tolist())
            hit = self._present_cache[label_path] = (key, {n: v for n, v in values.items() if v in held})
        return dict(hit[1])

    # ---- inference ----------------------------------------------------------------------------------------
    def __call__(self, request) -> Tuple[Optional[str], Dict]:
        t0 = time.time()
        vocab = self.vocab()
        ids = output_ids(vocab)
        routes, refused = self.routes()
        wanted = _names(request.get("labels") or request.get("label_names")) or list(self.default_labels)
        wanted = list(dict.fromkeys(canonical(w, vocab) for w in wanted))
        unknown = [w for w in wanted if w not in vocab]
        if unknown:
            raise RequestError(f"unknown label name(s) {unknown}; ensam_seg offers {len(routes)} names "
                               f"(GET /info/ -> models.ensam_seg.routes)", status_code=422)
        if not wanted:
            raise RequestError(f"ensam_seg offers no label name yet (none reaches the floor {self.floor:.2f}; "
                               f"GET /info/ -> models.ensam_seg.not_offered)", status_code=422)
        off = {w: refused[w] for w in wanted if w not in routes}
        if off:
            raise RequestError("not offered: " + "; ".join(f"{n!r} ({why})" for n, why in off.items())
                               + " (GET /info/ -> models.ensam_seg.not_offered)", status_code=422)
        ext, dtype, compress = _result_format(request)
        image = request.get("image")
        if not isinstance(image, str) or not image or not os.path.exists(image):
            raise RequestError(f"image not found: {request.get('_image_id') or image!r}", status_code=404)
        vol = self.volumes.get(image)
        t_load = time.time()
        device = resolve_device(first_value(request.get("device")))
        engine = self.provider.get(device)
        lock = self.provider.device_lock(device)
        if self.threads:
            from lib.atlas.segment import sitk_threads

            sitk_threads(self.threads)
        locked = LockedEngine(engine, lock)
        ds_names = [n for n in wanted if routes[n].get("pool") == "datastore"]
        if ds_names:  # the datastore's labels of these names are validated (leave-one-out) if not yet known
            routes, refused = self.routes(validate=ds_names, engine=locked)
            off = {w: refused[w] for w in wanted if w not in routes}
            if off:
                raise RequestError("not offered: " + "; ".join(f"{n!r} ({why})" for n, why in off.items())
                                   + " (GET /info/ -> models.ensam_seg.not_offered)", status_code=422)

        out = np.zeros(vol.shape, dtype=np.uint8 if max(ids.values(), default=0) < 256 else np.uint16)
        by_atlas = [n for n in wanted if routes[n]["route"] in ATLAS_ROUTES]
        by_token = [n for n in wanted if routes[n]["route"] == "token"]
        structures: Dict[str, dict] = {}
        masks: Dict[str, Any] = {}  # name -> full boolean mask (token) or lib.atlas Structure (atlas)
        ds_pool = [n for n in by_atlas if routes[n].get("pool") == "datastore"]
        for names, seg in ((ds_pool, self.ds_seg), ([n for n in by_atlas if n not in ds_pool], self.seg)):
            if not names:
                continue
            with (self._ds_seg_lock if seg is self.ds_seg else contextlib.nullcontext()):
                if seg is self.ds_seg:  # the datastore's atlases only, up to DATASTORE_ATLASES (library swapped)
                    carried = self._datastore_carriers()
                    seg.library = self.library.subset(list({a.key: a for n in names for a in carried.get(n, [])}
                                                           .values()))
                seg.engine = locked
                res = seg.segment(vol.array, vol.affine, names, image_key=vol.key,
                                  log=lambda m: logger.info(f"ensam_seg: {m}"),
                                  atlas_only=[n for n in names if routes[n]["route"] == "atlas"])
            for n in names:
                s = res.structures.get(n)
                info = {k: routes[n][k] for k in ("route", "validation", "pool", "provisional") if k in routes[n]}
                if s is None:
                    structures[n] = dict(info, missing=res.missing.get(n, ""))
                    continue
                masks[n] = s  # pasted below, from its region only
                structures[n] = dict(s.summary(), **info)
        if by_token:
            with lock:
                got = engine.segment_labels(vol.array, vol.affine, [vocab[n] for n in by_token])
            for n in by_token:
                masks[n] = np.asarray(got[vocab[n]]) > 0
                structures[n] = {"route": "token", "validation": routes[n]["validation"]}
        t_done = time.time()
        for n in wanted:  # later names win where structures overlap
            m = masks.get(n)
            if m is None:
                continue
            if isinstance(m, np.ndarray):
                out[m] = ids[n]
            else:
                m.paste(out, ids[n])
        counts = {n: int(np.count_nonzero(out == ids[n])) for n in wanted}
        path = write_mask(out, vol, extension=ext, dtype=dtype, compress=compress)
        t_end = time.time()
        res_json = {
            "label_names": {n: ids[n] for n in sorted(wanted, key=ids.get) if counts[n]},
            "requested": wanted,
            "voxels": counts,
            "structures": _jsonable(structures),
            "latencies": {"pre": round(t_load - t0, 4), "infer": round(t_done - t_load, 4),
                          "post": round(t_end - t_done, 4), "total": round(t_end - t0, 4)},
        }
        res_json.update(self.provider.weights_info(engine))
        return path, res_json

    def segmenter(self, name: str, pool: Optional[str], engine=None) -> SegmentByExample:
        """A segmenter of its own for ``name`` that answers as this task does: for a name of the datastore pool,
        the datastore's atlases of it (up to ``DATASTORE_ATLASES``, local fusion); otherwise the reference library
        with this task's settings (the uncertainty score rebuilds the task's answer with it, issue 29)."""
        if pool == "datastore":
            return SegmentByExample(self.library.subset(self._datastore_carriers().get(name, [])), engine,
                                    max_atlases=DATASTORE_ATLASES, cache_images=1, **DATASTORE_FUSION)
        return SegmentByExample(self.library, engine, max_atlases=self.seg.max_atlases, cache_images=1,
                                fusion=self.seg.fusion, fusion_sigma=self.seg.fusion_sigma,
                                fusion_power=self.seg.fusion_power)


def _label_names(info: dict) -> Dict[str, int]:
    """{name: value} of a saved label: ``label_names`` (ensam's answers) or Slicer's ``label_info`` list."""
    for src in (info, info.get("params") or {}):
        names = src.get("label_names")
        if isinstance(names, dict) and names:
            return {str(k): int(v) for k, v in names.items()}
        items = src.get("label_info")
        if isinstance(items, list) and items:
            return {str(i["name"]): int(i["idx"]) for i in items if isinstance(i, dict) and "name" in i
                    and "idx" in i}
    return {}
