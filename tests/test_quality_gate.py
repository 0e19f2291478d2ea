"""Issue 26: the quality gate. The evaluator (lib.evaluation, the challenge's protocol) on the whole sample evaluation
set with the shipped weights and the shipped engine, box start and click start, every structure: each average
(step-0 DSC, DSC_AUC, NSD_AUC, final DSC, final NSD) must be within a stated margin of the figures recorded in the
weights' metadata (``meta["evaluation"]``, measured when the release was made) and above the best classical method
on the same protocol (apps/ensam/model/classical_baselines.json). A change to the engine, the geometry, the prompt
code or the weights that lowers quality fails here.

Margins: 0.01 on the DSC / NSD averages (range 0..1) and 0.04 on the AUCs (range 0..4): the evaluation is
deterministic (seeded boxes and click tie-breaks), so a faithful build reproduces the recorded figures to about
0.001 (measured 2026-12-06 on this machine: box 0.663 / 2.985 / 2.840 / 0.780 / 0.748, click start 0.530 / 2.882 /
2.669 / 0.770 / 0.727 against the recorded 0.663 / 2.988 / 2.843 / 0.781 / 0.750 and 0.531 / 2.891 / 2.680 / 0.771 /
0.728); a release that loses 0.02 on any average fails.

When an engine setting decided on the tuning split changes the evaluation-set figures after a release (issue 27: the
guarded corrections), the engine's figures are recorded in apps/ensam/model/engine_evaluation.json for those weights
(by their SHA-256; never more than the margins below the release's figures) and the gate holds the engine to them;
new weights bring their own ``meta["evaluation"]`` (and the record goes or is re-measured with them). Release 7
(2026-12-07) did so: its figures were measured with the guarded engine and the record was removed."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lib.evaluation.evaluator import EnsamMethod, evaluate, run_name
from lib.io.digest import sha256_file
from lib.weights import read_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "apps", "ensam", "model", "pretrained_ensam.pt")
EVAL = os.path.join(ROOT, "sample-datasets", "eval")
CLASSICAL = os.path.join(ROOT, "apps", "ensam", "model", "classical_baselines.json")
ENGINE_RECORD = os.path.join(ROOT, "apps", "ensam", "model", "engine_evaluation.json")
KEYS = ("box_dsc", "dsc_auc", "nsd_auc", "final_dsc", "final_nsd")
MARGIN = {"box_dsc": 0.01, "final_dsc": 0.01, "final_nsd": 0.01, "dsc_auc": 0.04, "nsd_auc": 0.04}
RECORDED = {"box": "engine (boundary cut on)", "click": "engine, click start"}  # meta["evaluation"] rows
# The first answer to a lone click (release 6's main weights, kept in releases 7 and 8) is level with graph cut's (0.530
# vs 0.530 recorded): issue 27's target.
# Until a release is above it, the gate holds that average within its margin of graph cut, all others above.
LEVEL_WITH_CLASSICAL = {("click", "box_dsc")}


@pytest.fixture(scope="module")
def measured():
    assert os.path.exists(os.path.join(EVAL, "dataset.json")), "sample-datasets/eval missing (make data)"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = evaluate([EnsamMethod(weights=WEIGHTS)], EVAL, seed=0, n_clicks=5, jitter=3, starts=("box", "click"),
                       progress=False, measure_memory=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return {start: res["methods"][run_name("ensam", start)]["overall"] for start in RECORDED}


def recorded_figures(row: str, record_path: str = ENGINE_RECORD, weights: str = WEIGHTS) -> dict:
    """The figures the gate holds the shipped engine to: the engine record when it names these weights (by SHA-256),
    else the weights' own release figures. A record below the release's figures by more than the margins is refused
    (AssertionError): an engine change may not buy its gains with a loss the gate would have refused."""
    release = read_meta(weights)["evaluation"][row]
    if not os.path.exists(record_path):
        return release
    record = json.load(open(record_path))
    if record["weights_sha256"] != sha256_file(weights):
        return release
    figures = record["evaluation"][row]
    for k in KEYS:
        assert figures[k] >= release[k] - MARGIN[k], (row, k, figures[k], release[k])
    return figures


def test_an_engine_record_counts_only_for_the_weights_it_names_and_near_their_release(tmp_path):
    release = read_meta(WEIGHTS)["evaluation"]
    rec = tmp_path / "engine_evaluation.json"
    near = {row: {k: release[row][k] - MARGIN[k] / 2 for k in KEYS} for row in RECORDED.values()}
    rec.write_text(json.dumps({"weights_sha256": sha256_file(WEIGHTS), "evaluation": near}))
    for row in RECORDED.values():
        assert recorded_figures(row, str(rec)) == near[row]
    rec.write_text(json.dumps({"weights_sha256": "0" * 64, "evaluation": near}))  # a stale record: other weights
    for row in RECORDED.values():
        assert recorded_figures(row, str(rec)) == release[row]
        assert recorded_figures(row, str(tmp_path / "absent.json")) == release[row]
    far = {row: {k: release[row][k] - 2 * MARGIN[k] for k in KEYS} for row in RECORDED.values()}
    rec.write_text(json.dumps({"weights_sha256": sha256_file(WEIGHTS), "evaluation": far}))
    with pytest.raises(AssertionError):
        recorded_figures(RECORDED["box"], str(rec))


def test_a_shipped_engine_record_names_the_shipped_weights():
    """A record left behind by other weights would silently stop counting (the gate falls back to the meta): new
    weights must come with the record removed or re-measured."""
    if os.path.exists(ENGINE_RECORD):
        assert json.load(open(ENGINE_RECORD))["weights_sha256"] == sha256_file(WEIGHTS)
        for row in RECORDED.values():
            assert recorded_figures(row) == json.load(open(ENGINE_RECORD))["evaluation"][row]
    else:
        for row in RECORDED.values():
            assert recorded_figures(row) == read_meta(WEIGHTS)["evaluation"][row]


@pytest.mark.parametrize("start", list(RECORDED))
def test_shipped_quality_holds(measured, start):
    recorded = recorded_figures(RECORDED[start])
    classical = json.load(open(CLASSICAL))[start]
    got = measured[start]
    rows = []
    for k in KEYS:
        best_classical = max(m[k] for m in classical.values())
        rows.append(f"{k:10s} measured {got[k]:.3f}  recorded {recorded[k]:.3f}  best classical {best_classical:.3f}")
    print(f"\nquality gate, {start} start ({got['n_structures']} structures, {got['seconds_per_step']:.2f} s/step):\n"
          + "\n".join(rows))
    assert got["n_structures"] == 54 and got["n_errors"] == 0
    for k in KEYS:
        assert got[k] >= recorded[k] - MARGIN[k], (start, k, got[k], recorded[k])
        best_classical = max(m[k] for m in classical.values())
        if (start, k) in LEVEL_WITH_CLASSICAL:  # not above it yet: never below it by more than the margin
            assert got[k] >= best_classical - MARGIN[k], (start, k, got[k], classical)
        else:
            assert got[k] > best_classical, (start, k, got[k], classical)
