"""TaskConfig for ensam: one network, three infer tasks (interactive, segmentation, scribbles), one train task,
two scoring methods, four strategies.

Selected with ``--conf models ensam``. Its settings (``--conf key value``) are declared in ``lib.settings``
(name, type, default, bounds, description) and read by ``lib.settings.parse_conf`` before anything is built: an
unknown key or a bad value stops the start naming the key. The table below is rendered from those declarations.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Optional, Union

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.activelearning import (NoveltyScoring, NoveltyStrategy, RandomStrategy, UncertaintyScoring,
                                UncertaintyStrategy)
from lib.infers import EngineProvider, EnsamInteractive
from lib.infers.seg_by_example import EnsamSegByExample
from lib.infers.scribbles import EnsamScribbles
from lib.io.imageio import VolumeCache
from lib.session import SessionRegistry
from lib.settings import CONF, Settings, parse_conf, render_table
from lib.trainers import EnsamTrain

__doc__ += "\n" + render_table(CONF)

# ``--conf conservative_corrections true`` (strict; unset = the engine's guarded default, false = off):
# EngineConfig.correction_reach (k, margin mm, mode), the setting measured
# on the tuning split (model card, "Engine settings decided on the tuning split")
CONSERVATIVE_CORRECTIONS = (3.0, 3.0, "asym")


class EnsamConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        self.settings = s = parse_conf(conf)  # first: a bad --conf stops the start, naming the key
        super().init(name, model_dir, conf, planner, **kwargs)
        os.makedirs(model_dir, exist_ok=True)
        self.path = [os.path.join(model_dir, f"pretrained_{name}.pt"), os.path.join(model_dir, f"{name}.pt")]
        self.network_config = self._network_config(s.network)  # None: from <weights>.json
        self.num_labels = int((self.network_config or {}).get("num_labels", 128))
        self.extra_names = s.labels  # names added to the vocabulary (free token ids)
        self.seg_labels = s.seg_labels  # what auto segmentation segments by default
        self.provider = EngineProvider(self.path, network_config=self.network_config,
                                       engine_kwargs=self._engine_kwargs(s))
        self.volumes = VolumeCache(max_items=s.image_cache)
        self.sessions = SessionRegistry(max_sessions=s.sessions, max_history=s.session_history,
                                        max_bytes=int(s.session_mb * 2**20))
        from lib.atlas.segment import default_atlas_folder

        self.seg_task = EnsamSegByExample(  # issue 12: by example (atlases -> prompts -> ensam) or by token
            self.provider, self.volumes, s.atlases or default_atlas_folder(os.path.dirname(model_dir)),
            os.path.join(model_dir, "atlas_validation.json"), self.extra_names, self.seg_labels,
            num_labels=self.num_labels, floor=s.seg_floor, threads=s.atlas_threads)
        if s.preload:  # default; --conf preload false leaves both to the first request
            self._warm_up()

    def _warm_up(self) -> None:
        """The server builds its engine and runs it once on a dummy volume (``EngineProvider.warm_up``) while the
        app is created: monailabel creates it before uvicorn accepts connections, so this is done before ``/info``
        ever answers and never competes with a user's click (the start-up scoring is only started afterwards, when
        the server has been idle). Only the server does it (``main.EnsamApp`` has set its interactive gate,
        ``ENSAM_INTERACTIVE_GATE``, before it creates the config): background task processes (scoring, batch
        inference, training re-create the app) and other users of the config (``lib.configs.train_plan``) build the
        engine when their work needs it. The warm-up's stretch is written to the interactive gate's event log
        (``ENSAM_GATE_LOG``) as ``warm_up`` (directly: creating the gate here would start its idle clock, which
        defers the start-up scoring, before the datastore is even read)."""
        from lib.activelearning.interactive_gate import GATE_ENV, LOG_ENV
        from lib.background import in_background_task

        if in_background_task() or not os.environ.get(GATE_ENV):
            return
        t0 = time.time()
        try:
            event = dict(ev="warm_up", **self.provider.warm_up(None))
        except Exception as e:  # noqa: BLE001 - the server still starts; the first request meets the same problem
            logging.getLogger(__name__).exception("ensam warm-up failed; the first request will build the engine")
            event = dict(ev="warm_up_failed", error=f"{type(e).__name__}: {e}"[:300])
        if os.environ.get(LOG_ENV):
            with open(os.environ[LOG_ENV], "a") as f:
                f.write(json.dumps(dict(event, t0=t0, t1=time.time(), pid=os.getpid())) + "\n")

    @staticmethod
    def _engine_kwargs(conf: Union[Settings, Dict[str, str]]) -> dict:
        """Engine settings from ``--conf`` (only those given; the rest are the engine's defaults)."""
        from lib.click_scale import LoneClickView
        from lib.engine import EngineConfig
        from lib.graphcut import BoundaryCut

        s = parse_conf(conf) if isinstance(conf, dict) else conf
        settings = {k: (stage() if getattr(s, k) else None)  # on = the stage's defaults
                    for k, stage in (("boundary_cut", BoundaryCut), ("lone_click_view", LoneClickView))
                    if getattr(s, k) is not None}
        if s.conservative_corrections is not None:
            strict = CONSERVATIVE_CORRECTIONS if s.conservative_corrections else ()
            settings["correction_reach"] = settings["lone_correction_reach"] = strict
        if s.bf16 != "auto":
            settings["bf16"] = s.bf16
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
            atlas_folder=self.settings.atlases or None,  # --conf atlases: also the reference volumes of rehearsal
        )

    def strategy(self) -> Union[None, Strategy, Dict[str, Strategy]]:
        return {"random": RandomStrategy(), "novelty": NoveltyStrategy(), "uncertainty": UncertaintyStrategy()}

    def scoring_method(self) -> Union[None, ScoringMethod, Dict[str, ScoringMethod]]:
        return {
            "novelty": NoveltyScoring(self.provider, self.volumes),
            "uncertainty": UncertaintyScoring(
                self.provider, self.volumes, self.extra_names, self.seg_task.default_labels, self.num_labels,
                by_example=self.seg_task,
            ),
        }
