"""Next-sample strategies ``random``, ``novelty`` and ``uncertainty`` (``first`` comes from monailabel).

Both choose among the unlabelled images (no ``final`` label), skip those served to someone in the last
``reset_s`` seconds (unless every candidate was), and fall back to the first unscored image when the scoring
method has not run yet. ``novelty`` is greedy core-set selection: the reference set is the labelled images PLUS
the ones recently served (they are being labelled now), so two annotators asking in a row get different,
mutually distant images. ``random`` draws uniformly among them; with an integer ``seed`` in the request the draw
is a function of the unlabelled set and the seed alone (recently served images are not skipped: a labelling-loop
simulation can repeat an order, or pair two runs on it); without one it is drawn from the system's entropy among
the images not recently served. ``uncertainty`` takes the highest stored ``uncertainty`` score (the predicted error of
``ensam_seg``'s answer for names segmented by example, the flip disagreement for names on the token route).
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List

import numpy as np
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.strategy import Strategy

from ..errors import RequestError
from .scoring import EMBED_KEY, novelty_scores, refresh

logger = logging.getLogger(__name__)


class _ScoreStrategy(Strategy):
    key = ""

    def __init__(self, description: str, reset_s: int = 3600):
        super().__init__(description)
        self.reset_s = int(reset_s)

    def _candidates(self, request, datastore: Datastore):
        refresh(datastore)
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        strategy = request.get("strategy", self.key)
        now = int(time.time())
        infos = {i: datastore.get_image_info(i) for i in images}
        recent = {i for i, info in infos.items()
                  if now - int(info.get("strategy", {}).get(strategy, {}).get("ts", 0)) < self.reset_s}
        return images, infos, recent

    def _pick(self, scores: Dict[str, float], images: List[str], recent: set):
        fresh = [i for i in images if i not in recent] or images
        scored = [i for i in fresh if i in scores]
        if not scored:
            return fresh[0], None
        best = max(scored, key=lambda i: (scores[i], -images.index(i)))
        return best, scores[best]


class RandomStrategy(_ScoreStrategy):
    key = "random"

    def __init__(self):
        super().__init__("Random unlabelled image (request 'seed': a reproducible draw)")

    def __call__(self, request, datastore: Datastore):
        seed = request.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise RequestError(f"'seed' must be a whole number >= 0, got {seed!r}")
        images, _, recent = self._candidates(request, datastore)
        if not images:
            return None
        fresh = images if seed is not None else [i for i in images if i not in recent] or images
        image = fresh[int(np.random.default_rng(seed).integers(len(fresh)))]
        logger.info(f"random: selected {image} of {len(fresh)} (seed {seed})")
        return {"id": image, "seed": seed}


class UncertaintyStrategy(_ScoreStrategy):
    key = "uncertainty"

    def __init__(self):
        super().__init__("Most uncertain unlabelled image (highest predicted error of the prompt-free answer)")

    def __call__(self, request, datastore: Datastore):
        images, infos, recent = self._candidates(request, datastore)
        if not images:
            return None
        scores = {i: float(info[self.key]) for i, info in infos.items() if self.key in info}
        image, score = self._pick(scores, images, recent)
        logger.info(f"uncertainty: selected {image} (score {score})")
        return {"id": image, self.key: score}


class NoveltyStrategy(_ScoreStrategy):
    key = "novelty"

    def __init__(self):
        super().__init__("Most novel unlabelled image (greedy core-set on the image encodings)")

    def __call__(self, request, datastore: Datastore):
        images, infos, recent = self._candidates(request, datastore)
        if not images:
            return None
        embeddings = {}
        for image_id in datastore.list_images():
            info = infos.get(image_id) or datastore.get_image_info(image_id)
            vec = (info.get(EMBED_KEY) or {}).get("vector")
            if vec:
                embeddings[image_id] = np.asarray(vec, dtype=np.float32)
        if embeddings:
            labelled = set(datastore.get_labeled_images(DefaultLabelTag.FINAL))
            scores = novelty_scores(embeddings, labelled, pending=recent)
        else:
            scores = {i: float(info[self.key]) for i, info in infos.items() if self.key in info}
        scores = {i: s for i, s in scores.items() if i in infos}
        image, score = self._pick(scores, images, recent)
        logger.info(f"novelty: selected {image} (distance {score})")
        return {"id": image, self.key: score}
