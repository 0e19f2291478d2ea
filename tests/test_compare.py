"""lib.evaluation.compare: two evaluator runs paired structure by structure (issue 27's report)."""

import json

import pytest

from lib.evaluation.compare import by_size, compare, largest_losses, main, paired, structures_of


def _run(values, method="ensam (click start)"):
    recs = [{"case": "ct", "label": i, "voxels": 100 * (i + 1), "box_dsc": v, "dsc_auc": 4 * v, "nsd_auc": 4 * v,
             "final_dsc": v, "final_nsd": v} for i, v in enumerate(values)]
    return {"methods": {method: {"structures": recs, "overall": {"harmful_steps": 0.1, "worst_drop": 0.3}}}}


def test_a_candidate_better_on_every_structure_is_significant_and_counted():
    a = _run([0.1 * i for i in range(1, 10)])
    b = _run([0.1 * i + 0.05 for i in range(1, 10)])
    res = compare(a, b)
    r = res["averages"]["box_dsc"]
    assert r["up"] == 9 and r["down"] == 0 and r["diff"] == pytest.approx(0.05)
    assert r["p"] < 0.01
    same = compare(a, a)["averages"]["final_dsc"]
    assert same["p"] == 1.0 and same["diff"] == 0.0


def test_what_the_average_hides_is_named_per_size_and_per_structure():
    """A candidate that gains a little on six small structures and loses much on the three largest: the average
    moves little, the by-size DSC_AUC and the largest losses name the large ones."""
    a = _run([0.5] * 9)
    b = _run([0.55] * 6 + [0.3] * 3)
    res = compare(a, b)
    assert res["dsc_auc_by_size"]["large"]["b"] == pytest.approx(1.2)
    assert res["dsc_auc_by_size"]["small"]["b"] > res["dsc_auc_by_size"]["small"]["a"]
    worst = res["largest_dsc_auc_losses"]
    assert sorted(x["label"] for x in worst) == [6, 7, 8]
    assert all(x["b"] < x["a"] for x in worst)
    _, sa, _ = structures_of(a, None)
    assert largest_losses(sa, sa) == []  # nothing falls: nothing named


def test_size_thirds_follow_the_voxel_counts():
    a = _run([0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1])
    s = by_size(*(structures_of(r, None)[1] for r in (a, a)))
    assert s["small"]["a"] == pytest.approx(0.9) and s["large"]["a"] == pytest.approx(0.1)
    assert s["small"]["n"] == s["medium"]["n"] == s["large"]["n"] == 3


def test_runs_over_different_structures_are_refused(tmp_path, capsys):
    a, b = _run([0.5, 0.6]), _run([0.5, 0.6, 0.7])
    with pytest.raises(ValueError, match="different structures"):
        paired(structures_of(a, None)[1], structures_of(b, None)[1],
               "box_dsc")
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(_run([0.6, 0.7])))
    main([str(pa), str(pb), "--json", str(tmp_path / "c.json")])
    assert "box_dsc" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["averages"]["box_dsc"]["up"] == 2
