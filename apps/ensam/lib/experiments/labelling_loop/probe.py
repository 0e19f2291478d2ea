"""Forgetting: box-protocol scores of a fixed subset of evaluation structures, shipped weights vs the round's."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from .config import EVAL_STRUCTURES


class ForgettingProbe:
    """Box-protocol scores (the evaluator's box step, its seeds) of a fixed subset of evaluation structures, computed
    in this process with given weights: their averages per image and overall."""

    def __init__(self, data_dir: str, spec: str = EVAL_STRUCTURES, seed: int = 0, jitter: int = 3):
        from lib.evaluation.evaluator import load_dataset
        from lib.io.volumes import load_volume

        self.seed, self.jitter = seed, jitter
        self.items: List[Tuple[str, int, str, np.ndarray, np.ndarray, np.ndarray]] = []
        wanted: Dict[str, List[str]] = {}
        for part in [p for p in spec.split(";") if p.strip()]:
            case_key, names = part.split(":", 1)
            wanted[case_key.strip()] = [n.strip() for n in names.split(",") if n.strip()]
        for case in load_dataset(data_dir):
            keys = [k for k in wanted if k in case.name]
            if not keys:
                continue
            img = load_volume(str(case.image))
            lab = np.asarray(load_volume(str(case.label)).array)
            by_name = {n: v for v, n in case.labels.items()}
            for name in wanted[keys[0]]:
                if name in by_name and (lab == by_name[name]).any():
                    self.items.append((case.name, int(by_name[name]), name, np.asarray(img.array), img.affine,
                                       lab == by_name[name]))

    def run(self, weights: Optional[str]) -> dict:
        from lib.evaluation.evaluator import EnsamMethod, _structure_seed, evaluate_structure

        if not self.items:
            return {}
        method = EnsamMethod(weights=weights, device="cpu")
        rows = []
        for case, value, name, image, affine, gt in self.items:
            rec = evaluate_structure(method, image, affine, gt, _structure_seed(self.seed, case, value), n_clicks=0,
                                     jitter=self.jitter, measure_memory=False)
            rows.append({"case": case, "name": name, "box_dsc": round(float(rec["box_dsc"]), 4),
                         "box_nsd": round(float(rec["box_nsd"]), 4)})
        averages = {}
        for group in sorted({r["case"] for r in rows}) + ["overall"]:
            sel = [r for r in rows if group in ("overall", r["case"])]
            for k in ("box_dsc", "box_nsd"):
                averages[f"{group}/{k}"] = round(float(np.mean([r[k] for r in sel])), 4)
        return {"weights": os.path.basename(weights) if weights else None, "structures": rows, "averages": averages}


def forgetting(shipped: dict, now: dict) -> dict:
    """Per evaluation-set average: shipped - now (> 0 = forgotten); ``max`` = the largest of them."""
    if not shipped or not now:
        return {}
    drop = {k: round(shipped["averages"][k] - now["averages"][k], 4) for k in shipped["averages"]}
    return {"drop": drop, "max": max(drop.values())}
