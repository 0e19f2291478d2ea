"""``python -m lib.batch``: batch inference from the command line (the REST route ``POST /batch/infer/{model}`` runs
the same job, :func:`lib.batch.job.run_job`).

Examples (from the repository root, ``PYTHONPATH=apps/ensam``)::

    # every volume of a folder, prompt-free names, here in one process
    python -m lib.batch --folder scans/ --names liver,spleen --out batch-out
    # a manifest of prompts for datastore ids, on a Ray cluster (GPU workers)
    python -m lib.batch --datastore sample-datasets/studies --manifest prompts.json --out batch-out \\
        --backend ray --ray-address auto --gpus-per-worker 1
    # every CT series of a PACS; the results go back to it as DICOM SEG
    python -m lib.batch --dicomweb http://pacs:8042/dicom-web --search Modality=CT --names liver --out batch-out

A re-run with the same inputs, weights and request does only the studies without a result. The exit status is 0
when every study has a result, 1 otherwise (the manifest, ``<out>/manifest.json``, gives each reason).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional


def _csv(v: Optional[str]) -> List[str]:
    return [s.strip() for s in (v or "").split(",") if s.strip()]


def default_weights(app_dir: str) -> Optional[str]:
    """The served weights by MONAI Label's convention: the last of model/pretrained_ensam.pt, model/ensam.pt that
    exists (fine-tuned weights win)."""
    paths = [os.path.join(app_dir, "model", n) for n in ("pretrained_ensam.pt", "ensam.pt")]
    existing = [p for p in paths if os.path.exists(p)]
    return existing[-1] if existing else None


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lib.batch", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="every volume file / DICOM series folder directly in this folder")
    src.add_argument("--datastore", help="a local MONAI Label studies folder (its image ids)")
    src.add_argument("--dicomweb", help="a DICOMweb base URL (with --series or --search)")
    p.add_argument("--images", help="comma-separated ids of --datastore / --folder to run (default: all)")
    p.add_argument("--series", help="comma-separated SeriesInstanceUIDs of --dicomweb")
    p.add_argument("--search", action="append", default=[], metavar="KEY=VALUE",
                   help="QIDO search filter of --dicomweb (repeatable), e.g. Modality=CT")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--manifest", help="JSON file of prompts per study (the REST batch manifest format)")
    what.add_argument("--names", help="comma-separated label names, segmented prompt-free")
    p.add_argument("--out", required=True, help="output folder (results/, failed/, manifest.json)")
    p.add_argument("--weights", help="weights file (default: the app's served weights)")
    p.add_argument("--labels", help="extra label names added to the vocabulary (as --conf labels)")
    p.add_argument("--network", help="JSON file with a NetworkConfig (as --conf network)")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address", default=None, help="Ray cluster: auto, host:port, ray://host:port "
                                                        "(default: RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--workers", type=int, default=0, help="Ray actors (default: cluster CPUs or GPUs per worker)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="> 0: GPU workers")
    p.add_argument("--device", default="auto", help="auto (GPU when the worker has one), cpu, cuda:0")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: its CPUs)")
    p.add_argument("--extension", default=".nii.gz", help="label file format (.nii.gz, .nrrd, ...)")
    p.add_argument("--no-dicom-seg", action="store_true", help="do not store DICOM SEG back to a DICOMweb input")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """(BatchJob, studies) from the command line."""
    from lib.batch.job import BatchJob
    from lib.batch.sources import (load_manifest, open_datastore, studies_from_datastore, studies_from_dicomweb,
                                   studies_from_folder, with_manifest)
    from lib.label_vocab import canonical, load_vocab

    app_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    weights = args.weights or default_weights(app_dir)
    if weights and not os.path.exists(weights):
        raise SystemExit(f"weights not found: {weights}")
    ids = _csv(args.images) or None
    if args.folder:
        studies = studies_from_folder(args.folder)
        if ids:
            by_id = {s.id: s for s in studies}
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise SystemExit(f"not in {args.folder}: {missing}")
            studies = [by_id[i] for i in ids]
    elif args.datastore:
        studies = studies_from_datastore(open_datastore(args.datastore), ids)
    else:
        search = dict(kv.split("=", 1) for kv in args.search)
        if not args.series and not search:
            raise SystemExit("--dicomweb needs --series or --search")
        studies = studies_from_dicomweb(args.dicomweb, _csv(args.series), search)
    network = None
    if args.network:
        with open(args.network) as f:
            data = json.load(f)
        network = dict(data.get("network", data))
    vocab = load_vocab([weights] if weights else [], _csv(args.labels))
    names: List[str] = []
    if args.manifest:
        manifest = load_manifest(args.manifest)
        studies = with_manifest(studies, manifest or {})
    else:
        names = [canonical(n, vocab) for n in _csv(args.names)]
        unknown = [n for n in names if n not in vocab]
        if unknown:
            raise SystemExit(f"unknown label names {unknown}; the weights know {sorted(vocab)}")
    job = BatchJob(out=args.out, weights=weights, network_config=network, names=names, vocab=vocab,
                   device=args.device, threads=args.threads, workers=args.workers,
                   cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                   extension=args.extension, dicom_seg=not args.no_dicom_seg)
    return job, studies


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from lib.batch.job import run_job

    job, studies = build(args)
    manifest = run_job(job, studies, backend=args.backend, ray_address=args.ray_address,
                       progress=not args.no_progress)
    print(json.dumps({k: manifest[k] for k in ("backend", "counts", "ran", "seconds", "error")}))
    print(f"manifest: {os.path.join(os.path.abspath(args.out), 'manifest.json')}")
    return 0 if manifest["counts"]["ok"] == len(manifest["studies"]) else 1


if __name__ == "__main__":
    sys.exit(main())
