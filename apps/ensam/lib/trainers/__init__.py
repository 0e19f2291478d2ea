"""MONAI Label train glue for ensam (the training loop lives in lib.training)."""

from .ensam_train import EnsamTrain

__all__ = ["EnsamTrain"]
