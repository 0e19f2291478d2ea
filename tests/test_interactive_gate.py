"""The interactive gate (lib/activelearning/interactive_gate.py): background work pauses while an inference is in
flight, across processes; and the engine provider serves newly published weights on the next request, with a
fingerprint (lib/infers/engine_provider.py). Fast: no server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from lib.activelearning import interactive_gate as G


@pytest.fixture()
def gate_env(tmp_path, monkeypatch):
    monkeypatch.setenv(G.GATE_ENV, str(tmp_path / "gate.lock"))
    monkeypatch.setenv(G.LOG_ENV, str(tmp_path / "gate.jsonl"))
    monkeypatch.setenv(G.RESUME_ENV, "0.05")
    monkeypatch.setenv(G.WAIT_ENV, "5")
    G._gates.clear()
    yield tmp_path
    G._gates.clear()


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gate_worker.py")


def _background_process(path, log, steps, step_s):
    """A background task process (tests/gate_worker.py), once it works under the gate."""
    proc = subprocess.Popen([sys.executable, WORKER, path, log, str(steps), str(step_s)], stdout=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not (os.path.exists(log) and any(e["ev"] == "work_start" for e in _read(log))):
        assert proc.poll() is None and time.time() < deadline, "the background process did not start"
        time.sleep(0.01)
    return proc


def _read(path):
    import json

    with open(path) as f:
        return [json.loads(line) for line in f]


def test_an_inference_pauses_background_work_of_another_process(gate_env):
    path, log = str(gate_env / "gate.lock"), str(gate_env / "gate.jsonl")
    proc = _background_process(path, log, 60, 0.02)
    try:
        g = G.gate()
        with g.interactive():
            inside = time.time()
            time.sleep(0.3)  # the inference: the background must not work meanwhile
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and int(out.strip().split("=")[1]) >= 1, out
    events = _read(log)
    click = [e for e in events if e["ev"] == "interactive"][0]
    assert click["t0"] <= inside and not click["timed_out"]
    work = [(e["t0"], e["t1"]) for e in events if e["ev"] == "work"]
    assert [w for w in work if w[1] <= click["t0"]] and [w for w in work if w[0] >= click["t1"]]  # before and after
    assert not [w for w in work if w[0] < click["t1"] and click["t0"] < w[1]], (click, work)
    assert g.stats()["background_yielded"] == 1 and g.stats()["wait_timeouts"] == 0


def test_the_wait_for_background_work_is_bounded(gate_env, monkeypatch):
    monkeypatch.setenv(G.WAIT_ENV, "0.2")
    G._gates.clear()
    g = G.gate()
    started, release = threading.Event(), threading.Event()

    def stubborn():  # work that reaches no pause point for a long time
        with g.background("stubborn"):
            started.set()
            release.wait(30)

    t = threading.Thread(target=stubborn)
    t.start()
    assert started.wait(30)
    t0 = time.monotonic()
    with g.interactive():
        waited = time.monotonic() - t0
    release.set()
    t.join(30)
    assert 0.15 <= waited < 5.0
    assert g.stats()["wait_timeouts"] == 1
    click = [e for e in _read(str(gate_env / "gate.jsonl")) if e["ev"] == "interactive"][0]
    assert click["timed_out"] is True


def test_a_killed_background_process_never_keeps_the_gate_shut(gate_env):
    path, log = str(gate_env / "gate.lock"), str(gate_env / "gate.jsonl")
    proc = _background_process(path, log, 100000, 0.05)
    proc.kill()  # dies holding the gate shared, never at a pause point again
    proc.wait(30)
    g = G.gate()
    t0 = time.monotonic()
    with g.interactive():
        pass
    assert time.monotonic() - t0 < 1.0 and g.stats()["wait_timeouts"] == 0


def test_network_layers_are_pause_points(gate_env):
    g = G.gate()
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    g.watch(net)
    g.watch(net)  # once only
    calls = []
    orig = G.BackgroundWork.checkpoint
    G.BackgroundWork.checkpoint = lambda self: calls.append(self.what) or orig(self)
    try:
        net(torch.zeros(1, 4))  # outside background work: nothing
        assert calls == []
        with g.background("scoring"):
            net(torch.zeros(1, 4))
    finally:
        G.BackgroundWork.checkpoint = orig
    assert len(calls) == 4  # the Sequential and its three layers


def test_without_a_gate_everything_passes_through(monkeypatch):
    monkeypatch.delenv(G.GATE_ENV, raising=False)
    G._gates.clear()
    g = G.gate()
    with g.interactive():
        with g.background("x") as work:
            work.checkpoint()
    assert isinstance(g, G._NoGate)


# ------------------------------------------------------------------------------------------------- weights
def _publish(path, seed, mtime_ns=None):
    from lib.network import NetworkConfig, build_network
    from lib.weights import save_artefact

    torch.manual_seed(seed)
    cfg = NetworkConfig(filters=8, blocks=(1, 1, 1), depth=1, heads=2, num_labels=8, roi_size=(16, 16, 16))
    net = build_network(cfg)
    save_artefact(path, net.state_dict(), {"network": cfg.to_dict()})
    if mtime_ns is not None:  # a file system with coarse timestamps: the new file has the old mtime
        os.utime(path, ns=(mtime_ns, mtime_ns))


def _sha16(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def test_the_next_request_gets_newly_published_weights_with_their_fingerprint(tmp_path):
    from lib.infers.engine_provider import EngineProvider

    pre, tuned = str(tmp_path / "pretrained_ensam.pt"), str(tmp_path / "ensam.pt")
    _publish(pre, 0)
    provider = EngineProvider([pre, tuned])
    e1 = provider.get("cpu")
    assert provider.get("cpu") is e1 and provider.loads == 1  # unchanged: no rebuild
    info = provider.weights_info(e1)
    assert info["weights"] == "pretrained_ensam.pt" and info["weights_version"] == _sha16(pre)
    assert provider.weights_info()["weights_version"] == _sha16(pre)

    _publish(tuned, 1)  # a training job publishes
    e2 = provider.get("cpu")
    assert e2 is not e1 and provider.loads == 2
    assert provider.weights_info(e2)["weights"] == "ensam.pt"
    assert provider.weights_info(e2)["weights_version"] == _sha16(tuned) != _sha16(pre)

    old_mtime = os.stat(tuned).st_mtime_ns
    _publish(tuned, 2, mtime_ns=old_mtime)  # published again within one timestamp tick
    assert os.stat(tuned).st_mtime_ns == old_mtime
    e3 = provider.get("cpu")
    assert e3 is not e2 and provider.loads == 3
    assert provider.weights_info(e3)["weights_version"] == _sha16(tuned)
    w2 = dict(e2.network.state_dict())
    assert any(not torch.equal(v, w2[k]) for k, v in e3.network.state_dict().items())
