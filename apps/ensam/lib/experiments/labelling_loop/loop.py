"""The loop itself: every order on its own fresh server, its labels, its fine-tuning rounds and their measures."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional

import numpy as np

from .annotator import annotate, measure_round
from .config import APP_DIR, ORDERS, SCORED_ORDERS, LoopConfig
from .instances import Instance, build_instances, find_instances, select
from .probe import ForgettingProbe, forgetting
from .server import Client, LoopServer
from .summary import _machine, _shown, summarize


def run_loop(cfg: LoopConfig, work: Optional[str] = None, log: Callable[[str], None] = print,
             progress: bool = True, checkpoint: Optional[Callable[[dict], None]] = None,
             deadline_minutes: float = 0.0) -> dict:
    """The whole experiment (every order of ``cfg.orders`` on its own fresh server); returns the result JSON.
    ``checkpoint(result)`` is called after each order (to write what is done so far). ``deadline_minutes`` > 0: an
    order is not started when the time so far plus the longest order so far would pass it (recorded in
    ``skipped_orders``)."""
    import nibabel as nib
    import torch
    from tqdm import tqdm

    torch.set_num_threads(max(1, cfg.threads))
    bad = [o for o in cfg.orders if o not in ORDERS]
    if bad:
        raise ValueError(f"unknown order(s) {bad}; known: {ORDERS}")
    own_work = work is None
    work = work or tempfile.mkdtemp(prefix="ensam_loop_")
    t_start = time.time()
    try:
        source = os.path.join(work, "instances")
        chosen = select(find_instances(cfg.data, cfg.pattern, cfg.modality, cfg.min_voxels, cfg.cases),
                        cfg.instances, cfg.seed)
        insts = build_instances(chosen, os.path.join(source, "images"), os.path.join(source, "gt"), cfg.margin_mm)
        if len(insts) < 2:
            raise SystemExit(f"family {cfg.family!r}: only {len(insts)} instance(s) in {cfg.data}")
        by_id = {i.image_id: i for i in insts}
        gts = {i.image_id: np.asarray(nib.load(i.gt_path).dataobj) != 0 for i in insts}
        log(f"{cfg.family}: {len(insts)} instances: " + ", ".join(f"{i.scan}/{i.name}" for i in insts))

        probe = ForgettingProbe(cfg.eval_data, cfg.eval_structures, cfg.seed, cfg.jitter) if cfg.eval_structures \
            else None
        shipped_weights = os.path.join(APP_DIR, "model", "pretrained_ensam.pt")
        t = time.time()
        shipped_eval = probe.run(shipped_weights) if probe else {}
        if shipped_eval:
            shipped_eval["seconds"] = round(time.time() - t, 1)
            log(f"forgetting probe, shipped weights: {shipped_eval['averages']} ({shipped_eval['seconds']} s)")

        result = {
            "experiment": "labelling loop (issue 29, item 1)",
            "config": dict(asdict(cfg), orders=list(cfg.orders), data=_shown(cfg.data),
                           eval_data=_shown(cfg.eval_data)),
            "instance_model": "one datastore image per instance: the scan cropped to the instance's bounding box + "
                              f"{cfg.margin_mm:g} mm per side; the label saved is that instance's mask (name "
                              f"{cfg.label!r}) on the crop",
            "instances": [{k: v for k, v in asdict(i).items() if k != "gt_path"} for i in insts],
            "machine": _machine(cfg.threads),
            "forgetting_probe": {"structures": cfg.eval_structures,
                                 "protocol": "box step of lib.evaluation (jittered 3D box, seeds of the evaluator), "
                                             "in-process engine",
                                 "shipped": shipped_eval},
            "orders": {},
        }
        baseline: Dict[str, dict] = {}
        longest = 0.0
        for order in cfg.orders:
            elapsed = time.time() - t_start
            if deadline_minutes > 0 and elapsed + longest > deadline_minutes * 60:
                why = (f"not started: {elapsed / 60:.1f} min so far + {longest / 60:.1f} min for an order would pass "
                       f"the {deadline_minutes:g} min deadline")
                result.setdefault("skipped_orders", {})[order] = why
                log(f"[{order}] {why}")
                continue
            t_order = time.time()
            order_dir = os.path.join(work, f"order_{order}")
            studies = os.path.join(order_dir, "studies")
            shutil.copytree(os.path.join(source, "images"), studies)
            t = time.time()
            with LoopServer(order_dir, studies, cfg.label, cfg.threads) as server:
                client = Client(server.url)
                log(f"[{order}] server ready in {time.time() - t:.0f} s ({server.url})")
                if not baseline:
                    it = tqdm(insts, desc="baseline (shipped weights)", disable=not progress)
                    for inst in it:
                        baseline[inst.image_id] = annotate(client, inst, gts[inst.image_id], cfg.label, cfg.seed,
                                                           cfg.target, cfg.max_clicks, cfg.jitter, "baseline")
                        it.set_postfix(clicks=baseline[inst.image_id]["clicks"])
                    result["baseline"] = baseline
                result["orders"][order] = _run_order(cfg, order, client, server, by_id, gts, baseline, probe,
                                                     shipped_eval, log, progress)
            result["orders"][order]["wall_minutes"] = round((time.time() - t_order) / 60, 2)
            longest = max(longest, time.time() - t_order)
            result["summary"] = summarize(result, cfg)
            result["wall_minutes"] = round((time.time() - t_start) / 60, 2)
            if checkpoint is not None:
                checkpoint(result)
        result["summary"] = summarize(result, cfg)
        result["wall_minutes"] = round((time.time() - t_start) / 60, 2)
        return result
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _run_order(cfg: LoopConfig, order: str, client: Client, server: LoopServer, by_id: Dict[str, Instance],
               gts: Dict[str, np.ndarray], baseline: Dict[str, dict], probe: Optional[ForgettingProbe],
               shipped_eval: dict, log, progress: bool) -> dict:
    from tqdm import tqdm

    steps: List[dict] = []
    rounds: List[dict] = []
    labelled: List[str] = []
    n_rounds_done = 0
    weights_state = {"weights": "pretrained_ensam.pt", "weights_mtime_ns": None}

    def round_record(r: int, train: Optional[dict]) -> dict:
        unl = [i for i in sorted(by_id) if i not in labelled]
        rec = {"round": r, "labels_so_far": len(labelled), "train": train}
        rec.update(measure_round(client, by_id, gts, unl, cfg.label, cfg.uncertainty))
        if probe is not None and r > 0:
            t = time.time()
            now = probe.run(os.path.join(server.weights_dir, "ensam.pt"))
            now["seconds"] = round(time.time() - t, 1)
            rec["forgetting_eval"] = now
            rec["forgetting"] = forgetting(shipped_eval, now)
        elif probe is not None:
            rec["forgetting"] = {"drop": {k: 0.0 for k in shipped_eval.get("averages", {})}, "max": 0.0}
        sp = (rec.get("spearman") or {}).get("rho")
        log(f"[{order}] round {r}: {len(labelled)} labels; ensam_seg mean DSC {rec['ensam_seg_mean']} on {len(unl)} "
            f"({rec['ensam_seg_route']}); spearman {sp}; forgetting {(rec.get('forgetting') or {}).get('max')}")
        return rec

    rounds.append(round_record(0, None))
    total = len(by_id)
    bar = tqdm(total=total, desc=f"order {order}", disable=not progress)
    while len(labelled) < total:
        if order in SCORED_ORDERS:
            params = {"images": ",".join(i for i in sorted(by_id) if i not in labelled)}
            if order == "uncertainty":
                params["labels"] = cfg.label
            client.scoring(order, params)
        # random: seeded by the loop's seed and the labels so far, so that two runs (other training settings, say)
        # label the same sequence and their clicks pair
        image_id = client.next_sample(order, {"seed": cfg.seed * 1000 + len(labelled)} if order == "random" else None)
        if image_id is None or image_id in labelled or image_id not in by_id:
            raise RuntimeError(f"[{order}] /activelearning/{order} gave {image_id!r} with {len(labelled)} labelled")
        inst = by_id[image_id]
        if n_rounds_done == 0 and image_id in baseline:  # the server state the baseline met: reuse it
            rec = dict(baseline[image_id], reused_baseline=True)
        else:
            rec = annotate(client, inst, gts[image_id], cfg.label, cfg.seed, cfg.target, cfg.max_clicks, cfg.jitter)
            rec["reused_baseline"] = False
        base = baseline[image_id]
        rec.update({"order_position": len(labelled), "labels_so_far": len(labelled), "round": n_rounds_done,
                    "shipped_clicks": base["clicks"], "shipped_reached": base["reached"],
                    "click_saving": _saving(base["clicks"], rec["clicks"])})
        saved = client.save_label(image_id, inst.gt_path, [{"name": cfg.label, "idx": 1}])
        labelled.append(image_id)
        rec["saved"] = saved.get("image") == image_id if isinstance(saved, dict) else bool(saved)
        steps.append(rec)
        bar.update(1)
        bar.set_postfix(clicks=rec["clicks"], shipped=base["clicks"], rnd=n_rounds_done)
        if n_rounds_done < cfg.rounds and len(labelled) % cfg.every == 0 and len(labelled) < total:
            train = train_round(client, server, cfg, weights_state)
            n_rounds_done += 1
            rounds.append(round_record(n_rounds_done, train))
    bar.close()
    ds = client.datastore()
    saved_final = sorted(i for i, o in (ds.get("objects") or {}).items() if (o.get("labels") or {}).get("final"))
    return {"sequence": [s["image_id"] for s in steps], "steps": steps, "rounds": rounds,
            "datastore_final_labels": saved_final}


def train_round(client: Client, server: LoopServer, cfg: LoopConfig, state: dict) -> dict:
    """One ``POST /train/ensam`` with the CPU budget; waits; checks that new weights were published."""
    before = (client.info().get("train_stats") or {}).get("ensam") or {}
    published = os.path.join(server.weights_dir, "ensam.pt")
    mtime_before = os.stat(published).st_mtime_ns if os.path.exists(published) else None
    params = {"device": "cpu", "max_seconds": cfg.train_seconds, "labels": cfg.label, "seed": cfg.seed,
              "val_split": cfg.val_split, "rehearsal": cfg.rehearsal, "cpu_processes": 1}
    if cfg.train_steps:
        params["max_steps"] = cfg.train_steps
    params.update(cfg.train_args)
    t = time.time()
    task = client.train(params, timeout=max(600.0, 6 * cfg.train_seconds + 600))
    wall = time.time() - t
    stats = (client.info().get("train_stats") or {}).get("ensam") or {}
    mtime_after = os.stat(published).st_mtime_ns if os.path.exists(published) else None
    out = {
        "status": task.get("status"),
        "request": params,
        "wall_seconds": round(wall, 1),
        "wall_minutes": round(wall / 60, 3),
        "train_seconds": stats.get("seconds"),
        "minutes": round(float(stats.get("seconds") or 0.0) / 60, 3),
        "total_seconds": stats.get("total_seconds"),
        "steps": stats.get("steps"),
        "val_before": stats.get("val_before"),
        "val_best": stats.get("val_best"),
        "reference_guard": stats.get("reference_guard"),  # the blend published (lib.training.reference_guard)
        "val_blended": stats.get("val_blended"),
        "train_images": stats.get("train_images"),
        "val_images": stats.get("val_images"),
        "info_before": {k: before.get(k) for k in ("start_ts", "status", "weights")},
        "info_after": {k: stats.get(k) for k in ("start_ts", "status", "weights")},
        "weights_mtime_ns_before": mtime_before,
        "weights_mtime_ns_after": mtime_after,
    }
    out["new_weights"] = bool(stats.get("status") == "DONE" and stats.get("weights") == "ensam.pt"
                              and mtime_after is not None and mtime_after != mtime_before
                              and stats.get("start_ts") != before.get("start_ts"))
    if task.get("status") != "DONE" or not out["new_weights"]:
        raise RuntimeError(f"the train round did not publish new weights: {out}\n"
                           + "\n".join((task.get("details") or [])[-20:]))
    state.update(weights="ensam.pt", weights_mtime_ns=mtime_after)
    return out


def _saving(shipped: int, now: int) -> Optional[float]:
    """1 - now / shipped (None when the shipped weights needed no click)."""
    return None if shipped <= 0 else round(1.0 - now / shipped, 4)
