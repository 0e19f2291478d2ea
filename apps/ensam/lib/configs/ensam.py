"""TaskConfig for ensam: one network, three infer tasks (interactive, segmentation, scribbles), one train task,
two scoring methods, four strategies.

Selected with ``--conf models ensam``. Settings (``--conf key value``):

=====================  ==============================================================================
``network``            JSON file with a NetworkConfig (default: ``<weights>.json`` beside the weights)
``labels``             comma-separated label names to add to the vocabulary (new learned label tokens)
``seg_labels``         names that auto segmentation / uncertainty use by default (comma-separated)
``session_history``    undo steps kept per (client, image, label) (default 10)
``session_mb``         memory for kept results, MiB (default 256)
``sessions``           (client, image, label) sessions kept (default 64)
``image_cache``        decoded images kept in memory (default 2)
``preload``            build the engine at start-up (default false; first request otherwise)
``atlases``            folder (dataset.json) of the reference atlases of ``ensam_seg`` (default: sample-datasets/train)
``seg_floor``          validation DSC a name's route must reach to be offered by ``ensam_seg`` (default 0.35)
``atlas_threads``      SimpleITK threads for atlas registration (default 0: SimpleITK's own choice)
``boundary_cut``       the graph cut after the network on the scan's grid (``lib.graphcut.BoundaryCut``):
                       ``true`` / ``false`` (default: the engine's, ``EngineConfig.boundary_cut``)
``lone_click_view``    size the view around a lone first click from the image (``lib.click_scale.LoneClickView``):
                       ``true`` / ``false`` (default: the engine's, ``EngineConfig.lone_click_view``)
``conservative_corrections``  a corrective click changes the previous answer only near itself: removals within
                       3 x its depth + 3 mm of a background click, additions connected to a foreground click
                       (``lib.correction``; ``true`` / ``false``, default false: measured in the model card)
=====================  ==============================================================================
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional, Union

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.activelearning import NoveltyScoring, NoveltyStrategy, UncertaintyScoring, UncertaintyStrategy
from lib.infers import EngineProvider, EnsamInteractive, SessionStore
from lib.infers.request_parsing import parse_bool
from lib.infers.seg_by_example import FLOOR, EnsamSegByExample
from lib.infers.scribbles import EnsamScribbles

# ``--conf conservative_corrections true``: EngineConfig.correction_reach (k, margin mm, mode), the setting measured
# on the tuning split (model card, "Engine settings decided on the tuning split")
CONSERVATIVE_CORRECTIONS = (3.0, 3.0, "asym")
from lib.io.imageio import VolumeCache
from lib.trainers import EnsamTrain

logger = logging.getLogger(__name__)


def _csv(v: Any) -> list:
    return [s.strip() for s in str(v or "").split(",") if s.strip()]


class EnsamConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        conf = conf or {}
        os.makedirs(model_dir, exist_ok=True)
        self.path = [os.path.join(model_dir, f"pretrained_{name}.pt"), os.path.join(model_dir, f"{name}.pt")]
        self.network_config = self._network_config(conf.get("network"))  # None: from <weights>.json
        self.num_labels = int((self.network_config or {}).get("num_labels", 128))
        self.extra_names = _csv(conf.get("labels"))  # names added to the vocabulary (free token ids)
        self.seg_labels = _csv(conf.get("seg_labels"))  # what auto segmentation segments by default

        if "infer_concurrency" in conf:  # it did nothing: the engine runs one inference at a time (its lock)
            logger.warning("--conf infer_concurrency is not an option any more: one inference runs on a device at "
                           "a time (the engine's network and encoding cache are shared); the value is ignored")
        self.provider = EngineProvider(self.path, network_config=self.network_config,
                                       engine_kwargs=self._engine_kwargs(conf))
        self.volumes = VolumeCache(max_items=int(conf.get("image_cache", 2)))
        self.sessions = SessionStore(
            max_sessions=int(conf.get("sessions", 64)),
            max_history=int(conf.get("session_history", 10)),
            max_bytes=int(float(conf.get("session_mb", 256)) * 2**20),
        )
        from lib.atlas.segment import default_atlas_folder

        self.seg_task = EnsamSegByExample(  # issue 12: by example (atlases -> prompts -> ensam) or by token
            self.provider, self.volumes, conf.get("atlases") or default_atlas_folder(os.path.dirname(model_dir)),
            os.path.join(model_dir, "atlas_validation.json"), self.extra_names, self.seg_labels,
            num_labels=self.num_labels, floor=float(conf.get("seg_floor", FLOOR)),
            threads=int(conf.get("atlas_threads", 0)))
        if parse_bool(conf.get("preload"), "preload"):  # --conf preload true
            self.provider.get(None)

    @staticmethod
    def _engine_kwargs(conf: Dict[str, str]) -> dict:
        """Engine settings from ``--conf`` (only those given; the rest are the engine's defaults)."""
        from lib.click_scale import LoneClickView
        from lib.engine import EngineConfig
        from lib.graphcut import BoundaryCut

        stages = {"boundary_cut": BoundaryCut, "lone_click_view": LoneClickView}  # on = the stage's defaults
        given = {k: parse_bool(conf[k], k) for k in stages if conf.get(k) is not None}
        settings = {k: stages[k]() if on else None for k, on in given.items()}
        if conf.get("conservative_corrections") is not None:
            on = parse_bool(conf["conservative_corrections"], "conservative_corrections")
            settings["correction_reach"] = CONSERVATIVE_CORRECTIONS if on else ()
        return {"config": EngineConfig(**settings)} if settings else {}

    def _network_config(self, path: Optional[str]) -> Optional[dict]:
        """An explicit network config (``--conf network file.json``), else None: the engine then reads the
        config saved beside the weights (``<weights>.json``), or uses the defaults."""
        if not path:
            return None
        with open(path) as f:
            data = json.load(f)
        return dict(data.get("network", data))

    def infer(self) -> Union[InferTask, Dict[str, InferTask]]:
        interactive = EnsamInteractive(self.provider, self.volumes, self.sessions)
        return {
            self.name: interactive,
            f"{self.name}_seg": self.seg_task,
            f"{self.name}_scribbles": EnsamScribbles(interactive),  # 3D Slicer's Scribbles: strokes as prompts
        }

    def trainer(self) -> Optional[TrainTask]:
        return EnsamTrain(
            self.model_dir,
            self.path,
            network_config=self.network_config,
            extra_names=self.extra_names,
            num_labels=self.num_labels,
        )

    def strategy(self) -> Union[None, Strategy, Dict[str, Strategy]]:
        return {"novelty": NoveltyStrategy(), "uncertainty": UncertaintyStrategy()}

    def scoring_method(self) -> Union[None, ScoringMethod, Dict[str, ScoringMethod]]:
        return {
            "novelty": NoveltyScoring(self.provider, self.volumes),
            "uncertainty": UncertaintyScoring(
                self.provider, self.volumes, self.extra_names, self.seg_task.default_labels, self.num_labels,
                by_example=self.seg_task,
            ),
        }
