"""The ENSAM network (model only; no MONAI Label dependency)."""

from .ensam import EnsamNet, NetworkConfig, add_mask_head, build_network
from .prompt_encoder import BG, BOX_MAX, BOX_MIN, FG, PAD, boxes_to_points, dense_prompt_maps

__all__ = ["EnsamNet", "NetworkConfig", "build_network", "add_mask_head", "dense_prompt_maps", "boxes_to_points",
           "BG", "FG", "BOX_MIN", "BOX_MAX", "PAD"]
