"""Interactive evaluation: metrics (DSC, NSD, AUC), the box + clicks protocol, classical baselines and a CLI
(``python -m lib.evaluation --data sample-datasets/eval --out eval-results``)."""

from .metrics import auc, dice, protocol_nsd, spacing_from_affine, surface_dice
from .evaluator import (EnsamMethod, Method, evaluate, evaluate_structure, load_dataset, summarize,
                        write_results)
from .baselines import BASELINES, BoxFill, GraphCut, RandomWalker, RegionGrowing, make_baseline

__all__ = ["auc", "dice", "protocol_nsd", "spacing_from_affine", "surface_dice", "EnsamMethod", "Method",
           "evaluate", "evaluate_structure", "load_dataset", "summarize", "write_results", "BASELINES", "BoxFill",
           "GraphCut", "RandomWalker", "RegionGrowing", "make_baseline"]
