"""One report from several evaluator runs (``results.json`` of ``python -m lib.evaluation``), e.g. the release's
weights with the shipped engine, the same network alone, and the baselines, each run on its own::

    python -m lib.evaluation.merge apps/ensam/model/EVALUATION.md \\
        runs/eval/rel_box/results.json runs/eval/rel_click/results.json \\
        "runs/eval/net_box/results.json:ensam=ensam, network only" \\
        "runs/eval/net_click/results.json:ensam (click start)=ensam, network only (click start)" \\
        runs/eval/baselines/results.json --keep-tail --plot apps/ensam/model/dsc_vs_step.png

A ``PATH:OLD=NEW`` argument renames a method of that run. Rows come in the order the runs and their methods are
given, box-start methods before click-start ones. The runs must share the protocol (seed, clicks, jitter, NSD
tolerance) and the data; a method given twice is refused. ``--keep-tail``: the sections the output file already
has after the generated report (hand-written sections below its "Machine:" line) are kept. ``--plot PNG``: the
merged runs' DSC-vs-step curves (:func:`lib.evaluation.report.plot_curves`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .evaluator import plot_curves, results_markdown

PROTOCOL_KEYS = ("seed", "clicks", "jitter_voxels", "nsd_tolerance_mm", "nsd_min_dsc")


def _parse(arg: str) -> tuple:
    """``PATH[:OLD=NEW[;OLD=NEW...]]`` -> (path, {old: new})."""
    path, _, ren = arg.partition(".json:")
    if not ren:
        return arg, {}
    renames = dict(part.split("=", 1) for part in ren.split(";"))
    return path + ".json", renames


def merge_results(runs: list) -> dict:
    """``runs``: [(results dict, {old name: new name})]. Returns one results dict (methods in order, box-start
    ones first). Raises ValueError for runs of different protocols or data, or a method given twice."""
    first = runs[0][0]
    methods: dict = {}
    for res, renames in runs:
        for k in PROTOCOL_KEYS:
            if res["protocol"].get(k) != first["protocol"].get(k):
                raise ValueError(f"protocol differs: {k} = {res['protocol'].get(k)} vs {first['protocol'].get(k)}")
        if Path(res["data"]).resolve() != Path(first["data"]).resolve():
            raise ValueError(f"data differs: {res['data']} vs {first['data']}")
        unknown = set(renames) - set(res["methods"])
        if unknown:
            raise ValueError(f"no method {sorted(unknown)} to rename (have {sorted(res['methods'])})")
        for name, m in res["methods"].items():
            name = renames.get(name, name)
            if name in methods:
                raise ValueError(f"method {name!r} given twice")
            methods[name] = m
    order = sorted(methods, key=lambda n: "(click start)" in n)  # stable: the given order within each start
    merged = dict(first)
    merged["methods"] = {n: methods[n] for n in order}
    merged["protocol"] = dict(first["protocol"])
    merged["protocol"]["starts"] = sorted({s for r, _ in runs for s in r["protocol"].get("starts", [])})
    corrections = {c for r, _ in runs for c in r["protocol"].get("corrections", [])}
    if corrections:
        merged["protocol"]["corrections"] = sorted(corrections)
    return merged


def _tail(path: Path) -> str:
    """What follows the generated report in ``path`` (after its "Machine:" line), or ""."""
    if not path.exists():
        return ""
    text = path.read_text()
    i = text.find("\nMachine: ")
    if i < 0:
        return ""
    j = text.find("\n", i + 1)
    return text[j + 1:].lstrip("\n") if j >= 0 else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.evaluation.merge", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the markdown report to write")
    ap.add_argument("runs", nargs="+", help="results.json of each run, optionally PATH:OLD=NEW[;OLD=NEW]")
    ap.add_argument("--keep-tail", action="store_true", help="keep the sections after the output's report")
    ap.add_argument("--plot", default=None, help="also write the merged DSC-vs-step curves to this PNG")
    a = ap.parse_args(argv)
    runs = []
    for arg in a.runs:
        path, renames = _parse(arg)
        runs.append((json.loads(Path(path).read_text()), renames))
    merged = merge_results(runs)
    out = Path(a.out)
    tail = _tail(out) if a.keep_tail else ""
    out.write_text(results_markdown(merged) + ("\n" + tail if tail else ""))
    if a.plot:
        plot_curves(merged, a.plot)
    print(f"{out}: {len(merged['methods'])} methods ({', '.join(merged['methods'])})"
          + (f"; curves {a.plot}" if a.plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
