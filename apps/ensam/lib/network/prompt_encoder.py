"""Prompt encoding: sparse tokens (clicks, box corners, label names) and dense prompt maps.

Point types (``point_types``): 0 background click, 1 foreground click, 2 box minimum corner, 3 box maximum
corner, -1 padding (ignored). Coordinates are model-grid voxel units, shape (B, N, 3).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PromptEncoder", "FourierPositions", "dense_prompt_maps", "boxes_to_points", "N_DENSE",
           "BG", "FG", "BOX_MIN", "BOX_MAX", "PAD"]

BG, FG, BOX_MIN, BOX_MAX, PAD = 0, 1, 2, 3, -1
N_DENSE = 4  # prev_mask, box_mask, fg click map, bg click map


class FourierPositions(nn.Module):
    """Absolute position features (used only by the "absolute" ablation): random Fourier features of a
    3D position, (B, N, 3) -> (B, N, dim)."""

    def __init__(self, dim: int, scale: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("proj", torch.randn(3, dim // 2) * scale)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        x = 2 * math.pi * pos @ self.proj
        return torch.cat((x.sin(), x.cos()), dim=-1)


class PromptEncoder(nn.Module):
    """Sparse prompt tokens.

    Each click / box corner becomes ``type_embed[type]`` (its position enters through rotary attention, or
    through :class:`FourierPositions` in the absolute ablation). A label name (concept) becomes
    ``label_embed[label_id]``. ``n_output`` learned output tokens are always prepended (the first one drives
    the mask head).

    forward(points (B,N,3), point_types (B,N), label_ids (B,) or None, stride) ->
        tokens (B, T, dim), positions (B, T, 3) in latent units centred on the grid, mask (B, T) bool
    """

    def __init__(self, dim: int, num_labels: int = 128, n_output: int = 2) -> None:
        super().__init__()
        self.type_embed = nn.Embedding(4, dim)
        self.label_embed = nn.Embedding(num_labels, dim)
        self.no_label = nn.Parameter(torch.zeros(dim))
        self.output_tokens = nn.Parameter(torch.randn(n_output, dim) * 0.02)
        self.n_output = n_output

    def forward(self, points: torch.Tensor, point_types: torch.Tensor, label_ids: torch.Tensor | None,
                grid_shape: tuple[int, int, int], stride: int):
        b = points.shape[0]
        dev, dt = self.output_tokens.device, self.output_tokens.dtype
        valid = point_types >= 0
        tok = self.type_embed(point_types.clamp(min=0)) * valid[..., None].to(dt)
        centre = (torch.tensor(grid_shape, device=dev, dtype=dt) - 1) / 2
        pos = (points.to(dt) - centre) / stride
        pos = pos * valid[..., None].to(dt)
        if label_ids is None:
            lab = self.no_label.expand(b, 1, -1)
        else:
            lab = self.label_embed(label_ids.to(dev)).unsqueeze(1)
        out = self.output_tokens.expand(b, -1, -1)
        tokens = torch.cat((out, lab, tok), dim=1)
        zeros = torch.zeros(b, self.n_output + 1, 3, device=dev, dtype=dt)
        positions = torch.cat((zeros, pos), dim=1)
        mask = torch.cat((torch.ones(b, self.n_output + 1, dtype=torch.bool, device=dev), valid), dim=1)
        return tokens, positions, mask


def boxes_to_points(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """boxes (B, K, 6) as [i0, i1, j0, j1, k0, k1] (model grid) -> points (B, 2K, 3), types (B, 2K)."""
    b, k, _ = boxes.shape
    lo = boxes[..., 0::2].minimum(boxes[..., 1::2])
    hi = boxes[..., 0::2].maximum(boxes[..., 1::2])
    pts = torch.stack((lo, hi), dim=2).reshape(b, 2 * k, 3)
    types = torch.tensor([BOX_MIN, BOX_MAX], device=boxes.device).repeat(k).expand(b, -1)
    return pts, types


def dense_prompt_maps(points: torch.Tensor, point_types: torch.Tensor, shape: tuple[int, int, int],
                      prev_mask: torch.Tensor | None = None, sigma: float = 2.0) -> torch.Tensor:
    """Dense prompt channels on the model grid.

    points (B, N, 3) model-grid voxel coordinates, point_types (B, N), prev_mask (B, 1, *shape) or None.
    Returns (B, 4, *shape): [prev_mask, box_mask (union of boxes given by consecutive BOX_MIN/BOX_MAX
    pairs), fg click map, bg click map]; click maps are Gaussian blobs of ``sigma`` voxels (max over clicks).
    """
    b, n, _ = points.shape
    dev = points.device
    dt = torch.float32
    axes = [torch.arange(s, device=dev, dtype=dt) for s in shape]
    out = torch.zeros(b, N_DENSE, *shape, device=dev, dtype=dt)
    if prev_mask is not None:
        out[:, 0] = prev_mask[:, 0].to(dt)
    pts = points.to(dt)
    for bi in range(b):
        types = point_types[bi]
        mins = pts[bi][types == BOX_MIN]
        maxs = pts[bi][types == BOX_MAX]
        for lo, hi in zip(mins, maxs):
            inside = [((a >= lo[d] - 0.5) & (a <= hi[d] + 0.5)).to(dt) for d, a in enumerate(axes)]
            box = inside[0][:, None, None] * inside[1][None, :, None] * inside[2][None, None, :]
            out[bi, 1] = torch.maximum(out[bi, 1], box)
        for ch, t in ((2, FG), (3, BG)):
            p = pts[bi][types == t]
            if len(p) == 0:
                continue
            g = [torch.exp(-((a[None, :] - p[:, d: d + 1]) ** 2) / (2 * sigma ** 2)) for d, a in enumerate(axes)]
            blob = g[0][:, :, None, None] * g[1][:, None, :, None] * g[2][:, None, None, :]  # (P, *shape)
            out[bi, ch] = blob.amax(dim=0)
    return out
