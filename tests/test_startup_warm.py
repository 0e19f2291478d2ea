"""The server's warm-up (issue 30: the first click after start-up runs warm), in process, with the shipped weights:

* ``EngineProvider.warm_up`` builds the engine once, runs a click and a corrective step on a dummy volume, and leaves
  nothing of the dummy in the encoding cache; the next ``get`` returns the same engine (no rebuild);
* ``EnsamConfig`` warms up only in the server (its interactive gate set, not a background task process) and only with
  ``preload`` (on by default): ``--conf preload false`` and other users of the config (``lib.configs.train_plan``,
  task processes) build nothing at start; the server's warm-up is written to the gate's event log.

The end-to-end check (warm-up done before ``/info`` first answers, the first click builds no engine, the scoring
process does not warm up) is in ``tests/test_startup_yields.py``.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import _APP, _copy_app

WEIGHTS = os.path.join(_APP, "model", "pretrained_ensam.pt")

pytestmark = pytest.mark.skipif(not os.path.exists(WEIGHTS), reason="no shipped weights (make data / fetch weights)")


def test_provider_warm_up_builds_once_and_leaves_the_cache_empty():
    from lib.infers.engine_provider import EngineProvider

    provider = EngineProvider([WEIGHTS])
    info = provider.warm_up("cpu")
    assert provider.loads == 1
    engine = provider.get("cpu")
    assert provider.loads == 1  # the warmed engine is the one requests get
    assert len(engine.cache) == 0 and engine.cache.hits == 0 and engine.cache.misses == 0
    assert info["device"] == "cpu" and info["click_s"] > 0 and info["corrective_s"] > 0
    assert info["seconds"] >= info["click_s"] + info["corrective_s"]
    assert not provider.device_lock("cpu").locked()


@pytest.fixture()
def model_dir(tmp_path):
    return os.path.join(_copy_app(str(tmp_path / "app")), "model")


def _config(model_dir, conf):
    from lib.configs.ensam import EnsamConfig

    c = EnsamConfig()
    c.init("ensam", model_dir, dict(conf), None)
    return c


def test_config_warms_up_in_the_server_only(model_dir, tmp_path, monkeypatch):
    from lib.activelearning.interactive_gate import GATE_ENV, LOG_ENV

    log = tmp_path / "gate.jsonl"
    monkeypatch.setenv(LOG_ENV, str(log))
    monkeypatch.delenv(GATE_ENV, raising=False)  # not a server (train_plan, a script): nothing built at start
    assert _config(model_dir, {}).provider.loads == 0
    monkeypatch.setenv(GATE_ENV, str(tmp_path / "gate.lock"))  # what main.EnsamApp sets in the server
    assert _config(model_dir, {"preload": "false"}).provider.loads == 0
    assert not log.exists()
    c = _config(model_dir, {})  # preload's default: on
    assert c.settings.preload is True and c.provider.loads == 1
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["ev"] for e in events] == ["warm_up"] and events[0]["pid"] == os.getpid()
    assert events[0]["t0"] <= events[0]["t1"] and events[0]["device"] == "cpu"
    assert len(c.provider.get(None).cache) == 0


def test_config_does_not_warm_up_in_a_background_task(model_dir, tmp_path, monkeypatch):
    import lib.background
    from lib.activelearning.interactive_gate import GATE_ENV

    monkeypatch.setenv(GATE_ENV, str(tmp_path / "gate.lock"))  # inherited from the server by its task processes
    monkeypatch.setattr(lib.background, "in_background_task", lambda: True)
    assert _config(model_dir, {}).provider.loads == 0
