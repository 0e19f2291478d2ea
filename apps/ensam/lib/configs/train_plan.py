"""The train task's plan as a file, built exactly as ``POST /train/ensam`` would build it: the app's own config (its
``--conf`` settings), its train task's request check and its :class:`lib.training.finetune_job.FinetuneJob`. The
plan is then run by every rank of a ``torchrun`` group with ``python -m lib.training.finetune_job run --plan``
(docs/SCALE_OUT.md)::

    python -m lib.configs.train_plan --studies <shared folder> --out plan.json [--request '{...}'] [--conf K V]

It lives here, above the app's config, because it builds the whole app; the training code below never imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Dict, List, Optional

from lib.configs.ensam import EnsamConfig
from lib.monailabel_patches import local_datastore


def build_plan(studies: str, app_dir: str, request: dict, conf: Optional[Dict[str, str]] = None) -> tuple:
    """(job, plan) exactly as ``POST /train/ensam`` with ``request`` would train on the local datastore ``studies``:
    the app's own train task (its ``--conf`` settings ``conf``, its request check) and job."""
    config = EnsamConfig()
    config.init("ensam", os.path.join(app_dir, "model"), dict(conf or {}), None)
    task = config.trainer()
    datastore = local_datastore(studies, read_only=True)
    return task.job, task.job.plan(task.parse_request(request), datastore)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lib.configs.train_plan",
        description="Write the plan POST /train/ensam would run on a local (shared) datastore; run it with "
                    "python -m lib.training.finetune_job run --plan (docs/SCALE_OUT.md).")
    parser.add_argument("--studies", required=True, help="the datastore folder (the same path on every node)")
    parser.add_argument("--app", default=os.path.join(os.path.dirname(__file__), "..", ".."),
                        help="the app folder (its model/ folder: initial weights, publication, train_stats.json)")
    parser.add_argument("--request", default="{}", help="the train request as JSON (as POST /train/ensam takes it)")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="the server's --conf settings that shape training (e.g. labels, network)")
    parser.add_argument("--out", required=True, help="the plan file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)s] %(levelname)s %(message)s")
    job, plan = build_plan(args.studies, os.path.abspath(args.app), json.loads(args.request), dict(args.conf))
    job.save_plan(plan, args.out)
    print(f"plan: {len(plan['train_items'])} train / {len(plan['val_items'])} val images, labels "
          f"{plan['label_names']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
