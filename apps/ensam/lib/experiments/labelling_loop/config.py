"""The labelling loop's constants (paths, orders, families of instances, forgetting probe) and its configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

# this file is apps/ensam/lib/experiments/labelling_loop/config.py
APP_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
REPO = os.path.dirname(os.path.dirname(APP_DIR))
ORDERS = ("first", "random", "novelty", "uncertainty")
SCORED_ORDERS = ("novelty", "uncertainty")  # strategies that read a scoring method's stored scores

# Families of instances within the training scans: the regular expression their label names match and the modality
# of the scans they are taken from ("" = any). The family's name is the label name the annotator saves.
FAMILIES = {
    "vertebrae": {"name": "vertebra", "pattern": r"^vertebrae_[CTL]\d+$", "modality": "CT"},
    "ribs": {"name": "rib", "pattern": r"^rib_(left|right)_\d+$", "modality": "CT"},
    "brain_regions": {"name": "aal_region", "pattern": r"^(Frontal|Temporal|Parietal|Occipital)_\w+_[LR]$",
                      "modality": "MR"},
    # across subjects: the whole hippocampus (the union of the anterior and posterior labels) of the 20 loop
    # subjects of the committed hippocampus set (lib.cohorts; never trained or tuned on), one instance per scan
    "hippocampus": {"name": "hippocampus", "pattern": r"^hippocampus$", "modality": "MR",
                    "data": os.path.join(REPO, "sample-datasets", "hippocampus"), "cases": "loop"},
}
# Forgetting probe: structures of the evaluation set (image name substring: names), box step only.
EVAL_STRUCTURES = "ct_dicom:spleen,liver,aorta,stomach;mr:spleen,liver,kidney_left,kidney_right"


@dataclass
class LoopConfig:
    family: str = "vertebrae"
    label: str = "vertebra"
    pattern: str = FAMILIES["vertebrae"]["pattern"]
    modality: str = "CT"
    data: str = os.path.join(REPO, "sample-datasets", "train")
    eval_data: str = os.path.join(REPO, "sample-datasets", "eval")
    eval_structures: str = EVAL_STRUCTURES
    instances: int = 8
    min_voxels: int = 200
    margin_mm: float = 15.0
    orders: Tuple[str, ...] = ("first", "random")
    every: int = 3
    rounds: int = 2
    train_seconds: float = 180.0
    train_steps: int = 0
    val_split: float = 0.2
    rehearsal: float = 0.3
    train_args: Dict[str, Any] = field(default_factory=dict)  # more keys of the train request (e.g. start_from)
    target: float = 0.90
    max_clicks: int = 10
    jitter: int = 3
    seed: int = 0
    threads: int = 1
    uncertainty: bool = True
    saving_after: int = 5  # the click saving is measured on instances labelled after this many labels
    cases: Tuple[str, ...] = ()  # only these scans of ``data`` (image names; () = all)


def family_config(family: str) -> dict:
    """A preset of :data:`FAMILIES` with its ``data`` (default: the training sources) and its ``cases`` resolved
    (a subject split of ``lib.cohorts`` named by the preset -> that split's image names; none -> ())."""
    preset = dict(FAMILIES[family])
    preset.setdefault("data", LoopConfig.data)
    split = preset.get("cases")
    if split:
        from lib.cohorts import subjects

        preset["cases"] = tuple(subjects(split, preset["data"]))
    else:
        preset["cases"] = ()
    return preset
