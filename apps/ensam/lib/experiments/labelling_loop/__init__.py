"""The labelling loop, simulated through the real server (issue 29, item 1): label a few instances of a structure
family, fine-tune, label the next ones, and measure whether they take fewer clicks.

What runs, per order (``first``, ``random``, ``novelty``, ``uncertainty``):

1. **A datastore of instances.** An *instance* is (scan, label value) of a family (e.g. the vertebrae of the CT
   training scans). Each instance becomes its OWN datastore image: the scan cropped to the instance's bounding box
   plus ``--margin-mm`` per side (neighbouring structures stay in view, unlabelled). The reference mask of that
   instance on the crop is kept outside the datastore: it is what the simulated annotator compares with. So the
   datastore holds one image per instance, and "labels saved" counts instances, as a site labelling one structure
   per scan would.
2. **A fresh server** (``monailabel start_server ... --uvicorn_app lib.server:app``, as tests/conftest.py starts it)
   on a throw-away copy of the app (code + a link to the shipped weights) and of that datastore, with the family's
   name added to the vocabulary (``--conf labels <family>``) and ``--conf seg_floor 0`` (so that ``ensam_seg``
   answers for the new name at every round, whatever its validation; the route and validation are recorded).
3. **The annotator** asks the server for the next image (``POST /activelearning/<order>``; ``novelty`` and
   ``uncertainty`` run their scoring method first, ``POST /scoring/<method>``), then works as 3D Slicer's
   Deepgrow does over HTTP (``POST /infer/ensam``): the box (ROI) of the reference, jittered as the evaluator does,
   then one click at a time at the deepest point of the largest error (:func:`lib.prompts.simulation.next_click`,
   the evaluator's rule and seeding), sending the box and every click so far with the same ``client_id`` and label
   (the server keeps the previous result), until DSC >= ``--target`` (0.90) or ``--max-clicks`` (10). The saved
   label (``PUT /datastore/label``, tag ``final``, Slicer's ``label_info``) is the reference mask: the annotator
   finishes by hand what the clicks left.
4. **Every ``--every`` labels** the train task runs (``POST /train/ensam`` with ``max_seconds`` = the CPU budget,
   ``labels`` = the family), the loop waits for it (``GET /train/``) and checks that new weights were published
   (``/info`` ``train_stats`` of a new run, DONE, ``weights`` = ``ensam.pt``; the next answer says ``ensam.pt``
   with a new mtime).
5. **Each round** (before the first label and after each training): ``ensam_seg`` (prompt-free, by example or by
   token, ``lib/infers/seg_by_example.py``) for the family on every instance not yet labelled, its DSC; the
   ``uncertainty`` score (``POST /scoring/uncertainty``) of those instances and its Spearman rank correlation with
   the error 1 - DSC of ``ensam_seg``; forgetting = the change of the box-protocol averages (``lib.evaluation``,
   box step only, same seeds) on a small fixed subset of ``sample-datasets/eval`` structures (``--eval-structures``),
   with the round's weights, against the shipped weights.

The clicks the shipped weights need for every instance (the baseline of the click saving) are measured once, on
the first order's server before anything is saved; an instance that an order labels before its first training round
meets exactly that server state, so the baseline record is reused for it (``reused_baseline``) instead of running
it again. Output: one JSON of every step (``--out``, docs/labelling_loop.json) and two plots (``--plots``).

    PYTHONPATH=apps/ensam python -m lib.experiments.labelling_loop --family vertebrae --instances 8 \\
        --orders first,random --every 3 --rounds 2 --train-seconds 180 --threads 1 --out docs/labelling_loop.json

Modules: ``config`` (constants, :class:`LoopConfig`), ``instances`` (the family's instances and their crops),
``server`` (the server process and the HTTP client), ``annotator`` (the simulated annotator, a round's measures),
``probe`` (forgetting), ``loop`` (the orders and their fine-tuning rounds), ``summary`` (summary and plots),
``cli`` (the command line).
"""

from __future__ import annotations

from .annotator import annotate, measure_round
from .cli import main
from .config import APP_DIR, EVAL_STRUCTURES, FAMILIES, ORDERS, REPO, SCORED_ORDERS, LoopConfig
from .instances import Instance, build_instances, crop_bounds, find_instances, instance_rng, select
from .loop import run_loop, train_round
from .probe import ForgettingProbe, forgetting
from .server import Client, LoopServer, copy_app
from .summary import plot, summarize

__all__ = [
    "APP_DIR", "REPO", "ORDERS", "SCORED_ORDERS", "FAMILIES", "EVAL_STRUCTURES",
    "Instance", "find_instances", "select", "crop_bounds", "build_instances", "instance_rng",
    "copy_app", "LoopServer", "Client",
    "annotate", "ForgettingProbe", "forgetting", "measure_round",
    "LoopConfig", "run_loop", "train_round",
    "summarize", "plot", "main",
]
