"""Issue 10, load and faults, at a small size (the full-size runs are by hand, figures in docs/RELIABILITY.md):

* scripts/loadtest.py: Slicer-style clients (box, then clicks, with client_id/label) on different images while a
  fine-tuning job runs and publishes new weights: no failed request, /info fast, the switch to the new weights clean;
* scripts/faults.py: SIGKILL of the server during label saves and weight publications, and of a training process
  mid-run: labels old-or-new and whole, the index consistent, the weights loadable, the server restarts and serves."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_load_small_with_training_and_weights_switch(tmp_path, capsys):
    load = _script("loadtest")
    rc = load.main(["--start", "--clients", "2", "--clicks", "2", "--min-requests", "3", "--after-switch", "2",
                    "--think", "1.0", "--train-seconds", "30", "--train-steps", "1", "--deadline", "600",
                    "--out", str(tmp_path / "load.json")])
    import json

    rep = json.loads((tmp_path / "load.json").read_text())
    print(json.dumps(rep, indent=1, default=str))  # the whole report in the failure output
    assert rep["failed_requests"] == 0, rep["failures"]
    assert rep["training"].get("status") == "DONE", rep["training"]
    assert not rep["weights_switch"]["problems"], rep["weights_switch"]
    assert len(rep["weights_switch"]["weights_versions_seen"]) == 2, rep["weights_switch"]  # before and after
    assert rep["by_kind"]["info"]["p95_s"] < 0.5, rep["by_kind"]
    assert rc == 0 and rep["ok"]


def test_sigkill_during_label_saves_weight_publications_and_training():
    faults = _script("faults")
    rep = faults.run(kills=2, train_kills=1, n_images=3, seed=1, log=lambda m: None, finish_training=False)
    assert rep["kills"] == {"label_save": 1, "weights_publish": 1, "training": 1}, rep
    assert rep["ok"], rep["problems"]


def test_a_killed_training_is_not_reported_running(tmp_path):
    """train_stats.json of a training whose process is gone reads as ERROR (it said RUNNING forever: Slicer showed a
    training in progress after the process was killed)."""
    import json
    import subprocess
    import sys

    from lib.trainers.ensam_train import EnsamTrain

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    task = EnsamTrain(str(tmp_path), [str(tmp_path / "w.pt")])
    (tmp_path / "train_stats.json").write_text(json.dumps({"status": "RUNNING", "pid": dead.pid, "epoch": 3}))
    s = task.stats()
    assert s["status"] == "ERROR" and "killed" in s["error"] and s["epoch"] == 3
    (tmp_path / "train_stats.json").write_text(json.dumps({"status": "RUNNING", "pid": os.getpid()}))
    assert task.stats()["status"] == "RUNNING"
