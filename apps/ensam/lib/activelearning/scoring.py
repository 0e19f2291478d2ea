"""Scoring methods ``novelty`` and ``uncertainty``; results go to the datastore's image info.

* ``novelty``: core-set distance. Each image gets an embedding (pooled encoder features, no prompt), stored in its
  info as ``ensam_embedding``; its score is the cosine distance to the NEAREST labelled image (tag ``final``), i.e.
  how far it lies from what the model has already been taught. With nothing labelled yet, the distance to the mean
  embedding of all images is used (outliers first).
* ``uncertainty``: for each of a few known label names (the auto-segmentation ones), a per-structure uncertainty;
  the image's score is their mean. A name that ``ensam_seg`` segments by example (atlas routes) gets the PREDICTED
  ERROR of the very answer ``ensam_seg`` gives (same atlas pool, count, fusion and route;
  :func:`lib.activelearning.features.atlas_answer_features`, :func:`~lib.activelearning.features.predicted_error`;
  issue 29): the mean of how far that answer lies from each registered atlas's mask (1 - mean Dice) and how
  badly the atlases fit the image after registration (exp(-mutual information)); the features are stored too
  (``uncertainty_features``). The old score, the atlases' disagreement among themselves and with the engine's
  mask (4 atlases, majority vote, whatever the route), measured the atlases, not the answer
  (``python -m lib.experiments.uncertainty_rank`` compares both). A name on the learned-token route gets the
  disagreement of the prompt-free predictions on the image as stored and mirrored along each axis (4 passes, at a
  coarse working spacing): 1 - mean pairwise Dice between the 4 masks (a name found nowhere counts 1).

Both skip images whose stored result was computed from the same image file and the same weights (``force=true``
recomputes); new weights (after training) make every score stale, so the rescoring that follows training redoes
them. Run them with ``POST /scoring/novelty`` / ``POST /scoring/uncertainty``.

Both are background work: they pause while an inference is in flight (between images, and in a task process before
every layer of the network: :mod:`lib.activelearning.interactive_gate`), so scoring never delays a click.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.infers.engine_provider import EngineProvider
from lib.io.imageio import VolumeCache, file_key
from lib.label_vocab import canonical, load_vocab
from lib.request_parsing import parse_bool

from .features import (WEIGHTS, atlas_answer_features, cosine_distance_matrix, disagreement, flip_predictions,
                       image_embedding, label_volume_mm3, predicted_error)
from .interactive_gate import gate

logger = logging.getLogger(__name__)

EMBED_KEY = "ensam_embedding"
SCORE_VERSION = 2  # of the uncertainty score by example (2: the predicted error of ensam_seg's answer, issue 29)


def refresh(datastore: Datastore) -> None:
    """Re-read the datastore file when another process (a scoring or training subprocess) changed it."""
    if isinstance(datastore, LocalDatastore):
        datastore.refresh()


def _stamp(provider: EngineProvider, image_uri: str) -> dict:
    info = provider.weights_info()
    return {"image": file_key(image_uri).split("|", 1)[1], "weights": info.get("weights"),
            "weights_mtime": info.get("weights_mtime")}


def _images(request: dict, datastore: Datastore) -> List[str]:
    images = request.get("images")
    if isinstance(images, str) and images not in ("", "all"):
        images = [s.strip() for s in images.split(",") if s.strip()]
    if not isinstance(images, list):
        images = datastore.list_images()
    known = set(datastore.list_images())
    return sorted(i for i in images if i in known)


class _EnsamScoring(ScoringMethod):
    key = ""

    def __init__(self, provider: EngineProvider, volumes: VolumeCache, description: str):
        super().__init__(description)
        self.provider = provider
        self.volumes = volumes

    def _engine(self, request):
        from lib.infers.engine_provider import resolve_device

        dev = request.get("device")
        dev = dev[0] if isinstance(dev, list) and dev else dev
        device = resolve_device(dev)
        # in a task process the provider makes every layer of the engine a pause point (never in the server: a
        # pause there would hold the device lock the inference waits for)
        return self.provider.get(device), self.provider.device_lock(device)


class NoveltyScoring(_EnsamScoring):
    key = "novelty"

    def __init__(self, provider: EngineProvider, volumes: VolumeCache):
        super().__init__(provider, volumes, "Core-set novelty: distance of the image's encoding to the labelled ones")

    def __call__(self, request, datastore: Datastore):
        with gate().background(f"scoring {self.key}") as work:
            return self._score(request, datastore, work)

    def _score(self, request, datastore: Datastore, work):
        start = time.time()
        refresh(datastore)
        force = parse_bool(request.get("force"), "force")
        ids = sorted(datastore.list_images())
        engine = lock = None
        embeddings: Dict[str, np.ndarray] = {}
        computed = 0
        for image_id in ids:
            work.checkpoint()
            uri = datastore.get_image_uri(image_id)
            info = datastore.get_image_info(image_id)
            stamp = _stamp(self.provider, uri)
            stored = info.get(EMBED_KEY)
            if not force and isinstance(stored, dict) and stored.get("stamp") == stamp and stored.get("vector"):
                embeddings[image_id] = np.asarray(stored["vector"], dtype=np.float32)
                continue
            if engine is None:
                engine, lock = self._engine(request)
            vol = self.volumes.get(uri)
            with lock:
                vec = image_embedding(engine, vol.array)
            embeddings[image_id] = vec
            datastore.update_image_info(
                image_id, {EMBED_KEY: {"vector": [round(float(x), 5) for x in vec], "stamp": stamp}}
            )
            computed += 1

        scores = novelty_scores(embeddings, set(datastore.get_labeled_images(DefaultLabelTag.FINAL)))
        wanted = set(_images(request, datastore))
        now = int(time.time())
        for image_id, s in scores.items():
            if image_id in wanted:
                datastore.update_image_info(image_id, {self.key: round(s, 6), f"{self.key}_ts": now})
        logger.info(f"novelty: {len(scores)} images ({computed} embeddings computed) in {time.time() - start:.1f}s")
        return {"method": self.key, "scores": {k: v for k, v in scores.items() if k in wanted},
                "computed": computed, "seconds": round(time.time() - start, 2)}


def novelty_scores(embeddings: Dict[str, np.ndarray], labelled: set,
                   pending: Optional[set] = None) -> Dict[str, float]:
    """Distance of every image to its nearest reference (labelled + ``pending``) image other than itself."""
    ids = sorted(embeddings)
    if not ids:
        return {}
    mat = np.stack([embeddings[i] for i in ids])
    refs = [i for i in ids if i in labelled or (pending and i in pending)]
    if not refs:
        centre = mat.mean(axis=0, keepdims=True)
        d = cosine_distance_matrix(mat, centre)[:, 0]
        return {i: float(v) for i, v in zip(ids, d)}
    ref_mat = np.stack([embeddings[i] for i in refs])
    d = cosine_distance_matrix(mat, ref_mat)
    for r, rid in enumerate(refs):  # an image is not its own neighbour
        d[ids.index(rid), r] = np.inf
    nearest = d.min(axis=1)
    if len(refs) == 1:  # the only reference image has no other reference: use the mean over the rest
        others = [k for k, i in enumerate(ids) if i != refs[0]]
        nearest[ids.index(refs[0])] = float(np.mean(nearest[others])) if others else 0.0
    return {i: float(v) for i, v in zip(ids, nearest)}


class UncertaintyScoring(_EnsamScoring):
    """Request keys (all optional): ``labels`` (names; default: the first ``max_labels`` auto-segmentation
    names), ``max_labels`` (4), ``spacing_mm`` (working spacing of the prompt-free passes, 5.0: coarser than
    ``ensam_seg``'s 3 mm, a score only has to rank images; on CPU a 512x512x20 CT then takes ~8 s per pass),
    ``images`` (ids, default all), ``force``."""

    key = "uncertainty"
    SPACING_MM = 5.0
    MAX_LABELS = 4

    def __init__(self, provider: EngineProvider, volumes: VolumeCache, extra_names: Sequence[str] = (),
                 default_labels: Sequence[str] = (), num_labels: int = 128, by_example=None):
        super().__init__(provider, volumes, "Per-structure predicted error of ensam_seg's answer by example (its "
                                            "distance to the registered atlases, their registration's fit), else "
                                            "disagreement of prompt-free predictions under flips")
        self.by_example = by_example  # lib.infers.seg_by_example.EnsamSegByExample or None
        self.extra_names = list(extra_names)
        self.default_labels = list(default_labels)
        self.num_labels = int(num_labels)
        self._volumes_mm3: Dict[tuple, float] = {}  # (label file, mtime, value) -> volume of the structure

    def __call__(self, request, datastore: Datastore):
        with gate().background(f"scoring {self.key}") as work:
            return self._score(request, datastore, work)

    def _score(self, request, datastore: Datastore, work):
        start = time.time()
        refresh(datastore)
        force = parse_bool(request.get("force"), "force")
        vocab = load_vocab(self.provider.paths, self.extra_names, self.num_labels)
        wanted_labels = request.get("labels")
        if isinstance(wanted_labels, str):
            wanted_labels = [s.strip() for s in wanted_labels.split(",") if s.strip()]
        if not wanted_labels:
            wanted_labels = self.default_labels[: int(request.get("max_labels", self.MAX_LABELS))]
        wanted_labels = [canonical(n, vocab) for n in wanted_labels]
        labels = {n: vocab[n] for n in wanted_labels if n in vocab}
        spacing_mm = float(request.get("spacing_mm", self.SPACING_MM))
        if not labels:  # nothing to disagree about yet (e.g. at start-up before any label name is known)
            why = f"no known label name among {wanted_labels}" if wanted_labels else "ensam knows no label name yet"
            logger.info(f"uncertainty: skipped ({why})")
            return {"method": self.key, "scores": {}, "computed": 0, "skipped": why}
        by_atlas, routes = [], {}
        if self.by_example is not None:
            from lib.infers.seg_by_example import ATLAS_ROUTES

            routes, _ = self.by_example.routes()
            by_atlas = sorted(n for n in labels if routes.get(n, {}).get("route") in ATLAS_ROUTES)
        segs: Dict[str, object] = {}  # name -> its SegmentByExample, kept over the images of this call
        by_flips = {n: t for n, t in labels.items() if n not in by_atlas}
        engine = lock = None
        scores: Dict[str, float] = {}
        computed = 0
        for image_id in _images(request, datastore):
            work.checkpoint()
            uri = datastore.get_image_uri(image_id)
            info = datastore.get_image_info(image_id)
            stamp = dict(_stamp(self.provider, uri), labels=sorted(labels), spacing_mm=spacing_mm, atlas=by_atlas,
                         score=SCORE_VERSION, routes={n: [routes[n].get("route"), routes[n].get("pool"),
                                                          routes[n].get("atlases")] for n in by_atlas})
            meta = info.get(f"{self.key}_meta")
            if not force and meta == stamp and self.key in info:
                scores[image_id] = float(info[self.key])
                continue
            if engine is None:
                engine, lock = self._engine(request)
            vol = self.volumes.get(uri)
            per_label, features = {}, {}
            if by_atlas:
                from lib.infers.seg_by_example import LockedEngine

                locked = LockedEngine(engine, lock)
                for n in by_atlas:
                    err, feats = self._atlas_error(vol, n, routes[n], locked, segs)
                    per_label[n] = round(err, 6)
                    features[n] = {k: round(float(v), 5) for k, v in feats.items()}
                    work.checkpoint()
            if by_flips:
                with lock:
                    masks = flip_predictions(engine, vol.array, vol.affine, list(by_flips.values()),
                                             spacing_mm=spacing_mm)
                per_label.update({name: round(disagreement(masks[token]), 6) for name, token in by_flips.items()})
            score = float(np.mean(list(per_label.values())))
            scores[image_id] = score
            datastore.update_image_info(image_id, {
                self.key: round(score, 6), f"{self.key}_labels": per_label, f"{self.key}_meta": stamp,
                **({f"{self.key}_features": features} if features else {}),
                f"{self.key}_ts": int(time.time()),
            })
            computed += 1
        logger.info(f"uncertainty: {len(scores)} images ({computed} computed) in {time.time() - start:.1f}s")
        return {"method": self.key, "scores": scores, "computed": computed,
                "seconds": round(time.time() - start, 2)}

    def _atlas_error(self, vol, name: str, route: dict, engine, segs: Dict[str, object]):
        """(predicted error, its features) of ``ensam_seg``'s answer by example for ``name`` on ``vol``, the answer
        made as ``ensam_seg`` makes it (the datastore's atlases of the name, up to ``DATASTORE_ATLASES``, local vote,
        for a name of the datastore pool; the reference library as ``ensam_seg``'s own otherwise) and by its route
        (the engine runs only for the ``atlas+ensam`` route or a weighted feature that needs it)."""
        be = self.by_example
        seg = segs.get(name)
        if seg is None:
            seg = be.segmenter(name, route.get("pool"), engine)
            segs[name] = seg
        s, feats = atlas_answer_features(seg, vol.array, vol.affine, name, route.get("route", "atlas"), vol.key,
                                         reference_mm3=(self._reference_volumes(seg, vol, name)
                                                        if "volume" in WEIGHTS else []),
                                         log=lambda m: logger.debug(f"uncertainty: {m}"))
        return predicted_error(feats), feats

    def _reference_volumes(self, seg, vol, name: str) -> List[float]:
        """The volumes of ``name`` in the label files of the atlases ``seg`` selects for the image (cached)."""
        import os

        from lib.atlas.registration import guess_modality

        out = []
        for a in seg.select([name], guess_modality(np.asarray(vol.array))):
            if name not in a.names:
                continue
            try:
                key = (a.label_path, os.path.getmtime(a.label_path), a.names[name])
            except OSError:
                continue
            if key not in self._volumes_mm3:
                self._volumes_mm3[key] = label_volume_mm3(a.label_path, a.names[name])
            out.append(self._volumes_mm3[key])
        return out
