"""lib.evaluation.compare: two evaluator runs paired structure by structure (issue 27's report)."""

import json

import pytest

from lib.evaluation.compare import by_size, compare, main, paired, structures_of


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
