"""Prompt simulation shared by the interactive evaluator and by training (pure NumPy)."""

from .simulation import box_from_mask, mask_bbox, next_click

__all__ = ["box_from_mask", "mask_bbox", "next_click"]
