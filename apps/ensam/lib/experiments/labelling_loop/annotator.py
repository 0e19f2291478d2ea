"""The simulated annotator (box, then corrective clicks, through the server) and the measures of one round."""

from __future__ import annotations

import time
from typing import Dict, List, Tuple

import numpy as np

from .instances import Instance, instance_rng
from .server import Client


def annotate(client: Client, inst: Instance, gt: np.ndarray, label: str, seed: int, target: float = 0.90,
             max_clicks: int = 10, jitter: int = 3, client_id: str = "loop-annotator") -> dict:
    """One instance as a Slicer user segments it: the box, then one click at a time (the evaluator's rule) until
    DSC >= ``target`` or ``max_clicks`` clicks. ``clicks`` = corrective clicks spent (the box is not a click);
    ``reached`` says whether the target was met (else ``clicks`` = ``max_clicks``, a lower bound)."""
    from lib.evaluation.metrics import dice
    from lib.prompts.simulation import box_from_mask, next_click

    rng = instance_rng(seed, inst.image_id)
    box = box_from_mask(gt, jitter=jitter, rng=rng)
    fg: List[List[int]] = []
    bg: List[List[int]] = []
    params = {"roi": box.tolist(), "label": label, "client_id": client_id, "reset_state": True,
              "foreground": [], "background": []}
    rec = {"image_id": inst.image_id, "box": box.tolist(), "dsc": [], "seconds": [], "points": []}
    weights = None
    while True:
        t = time.time()
        mask, meta = client.infer("ensam", inst.image_id, params)
        if mask is None:
            raise RuntimeError(f"ensam refused a prompt on {inst.image_id}: {meta}")
        rec["seconds"].append(round(time.time() - t, 3))
        weights = {k: meta.get(k) for k in ("weights", "weights_mtime", "weights_mtime_ns")}
        pred = mask != 0
        d = float(dice(pred, gt))
        rec["dsc"].append(round(d, 4))
        if d >= target or len(fg) + len(bg) >= max_clicks:
            break
        click = next_click(pred, gt, rng)
        if click is None:
            break
        point, is_fg = click
        (fg if is_fg else bg).append([int(v) for v in point])
        rec["points"].append([int(v) for v in point] + [int(is_fg)])
        params = {"roi": box.tolist(), "label": label, "client_id": client_id, "foreground": fg, "background": bg}
    rec.update({"clicks": len(fg) + len(bg), "reached": rec["dsc"][-1] >= target, "final_dsc": rec["dsc"][-1],
                "box_dsc": rec["dsc"][0], "weights": weights})
    return rec



# ---------------------------------------------------------------------------------------------------- one round
def measure_round(client: Client, insts: Dict[str, Instance], gts: Dict[str, np.ndarray], unlabelled: List[str],
                  label: str, with_uncertainty: bool = True) -> dict:
    """``ensam_seg`` for ``label`` on every unlabelled instance (DSC, route), the ``uncertainty`` score of those
    instances and the Spearman correlation of the two (score vs 1 - DSC)."""
    from scipy.stats import spearmanr

    from lib.evaluation.metrics import dice

    out: dict = {"unlabelled": list(unlabelled), "ensam_seg": {}}
    t0 = time.time()
    route = None
    for image_id in unlabelled:
        mask, meta = client.infer("ensam_seg", image_id, {"labels": label})
        if mask is None:
            out["ensam_seg"][image_id] = {"dsc": None, "refused": meta}
            continue
        value = (meta.get("label_names") or {}).get(label)
        pred = (mask == value) if value is not None else np.zeros(mask.shape, dtype=bool)
        route = ((meta.get("structures") or {}).get(label) or {}).get("route", route)
        out["ensam_seg"][image_id] = {"dsc": round(float(dice(pred, gts[image_id])), 4), "voxels": int(pred.sum())}
    dscs = [v["dsc"] for v in out["ensam_seg"].values() if v.get("dsc") is not None]
    out["ensam_seg_mean"] = round(float(np.mean(dscs)), 4) if dscs else None
    out["ensam_seg_route"] = route
    out["ensam_seg_seconds"] = round(time.time() - t0, 1)
    routes = ((client.info().get("models") or {}).get("ensam_seg") or {}).get("routes") or {}
    out["ensam_seg_validation"] = (routes.get(label) or {}).get("validation")
    if with_uncertainty and unlabelled:
        t0 = time.time()
        res = client.scoring("uncertainty", {"labels": label, "images": ",".join(unlabelled)})
        scores = {k: float(v) for k, v in (res.get("scores") or {}).items() if k in unlabelled}
        out["uncertainty"] = {k: round(v, 5) for k, v in scores.items()}
        out["uncertainty_seconds"] = round(time.time() - t0, 1)
        pairs = [(scores[i], 1.0 - out["ensam_seg"][i]["dsc"]) for i in unlabelled
                 if i in scores and out["ensam_seg"][i].get("dsc") is not None]
        out["spearman"] = _spearman(pairs, spearmanr)
    return out


def _spearman(pairs: List[Tuple[float, float]], spearmanr) -> dict:
    if len(pairs) < 3:
        return {"rho": None, "p": None, "n": len(pairs), "why": "fewer than 3 unlabelled instances"}
    u, e = zip(*pairs)
    if len(set(u)) < 2 or len(set(e)) < 2:
        return {"rho": None, "p": None, "n": len(pairs), "why": "constant score or error"}
    rho, p = spearmanr(u, e)
    return {"rho": round(float(rho), 4), "p": round(float(p), 4), "n": len(pairs)}
