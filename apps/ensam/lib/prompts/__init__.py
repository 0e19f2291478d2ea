"""Prompt simulation shared by the interactive evaluator and by training (pure NumPy)."""

from .simulation import box_from_mask, mask_bbox, next_click, next_stroke
from .strokes import StrokeError, StrokePrompts, stroke_points, strokes_to_prompts

__all__ = ["box_from_mask", "mask_bbox", "next_click", "next_stroke", "StrokeError", "StrokePrompts", "stroke_points",
           "strokes_to_prompts"]
