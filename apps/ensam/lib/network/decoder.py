"""U-Net decoder with dense prompt injection at every scale and, for the SAMU variant, prompt
cross-attention at chosen scales."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import NormalizedAttention
from .blocks import ResBlock, norm3d
from .prompt_encoder import N_DENSE

__all__ = ["UNetDecoder", "grid_positions"]


def grid_positions(shape: tuple[int, int, int], factor: int, model_shape: tuple[int, ...], stride: int,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """Centres of the voxels of a grid downsampled by ``factor`` from ``model_shape``, in latent units
    (model-grid voxels / ``stride``) relative to the model grid centre. Returns (prod(shape), 3)."""
    axes = [(torch.arange(s, device=device, dtype=dtype) * factor + (factor - 1) / 2 - (m - 1) / 2) / stride
            for s, m in zip(shape, model_shape)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


class UNetDecoder(nn.Module):
    """Decoder from the latent level back to full resolution.

    Args:
        channels: encoder channels per level, finest first (level l has stride 2**l).
        token_dim: prompt-token channels (for the hypernetwork head and per-scale attention).
        attention_levels: levels (0 = finest .. len-2) where voxel features cross-attend to the prompt tokens
            (SAMU); empty for ENSAM.
    forward(feats (list, finest first; feats[-1] already prompt-conditioned), dense (B, 4, D, H, W),
            tokens (B, T, token_dim), t_pos (B, T, 3), t_mask (B, T), model_shape, stride) -> logits (B, 1, D, H, W);
            with ``features=True``, (logits, the full-resolution features (B, C0, D, H, W) they are read from)
    """

    def __init__(self, channels: list[int], token_dim: int, heads: int = 2, norm: str = "instance",
                 attention_levels: tuple[int, ...] = (), rotary: bool = True) -> None:
        super().__init__()
        n = len(channels)
        self.up = nn.ModuleList()
        self.dense = nn.ModuleList()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleDict()
        for lvl in range(n - 2, -1, -1):
            self.up.append(nn.ConvTranspose3d(channels[lvl + 1], channels[lvl], 2, stride=2, bias=False))
            self.dense.append(nn.Conv3d(N_DENSE, channels[lvl], 1))
            self.block.append(ResBlock(channels[lvl], norm))
            if lvl in attention_levels:
                self.attn[str(lvl)] = NormalizedAttention(channels[lvl], heads=max(1, channels[lvl] // 16),
                                                          kv_dim=token_dim, rotary=rotary)
        self.out_norm = nn.Sequential(norm3d(channels[0], norm), nn.ReLU(inplace=True))
        self.hyper = nn.Sequential(nn.Linear(token_dim, token_dim), nn.GELU(), nn.Linear(token_dim, channels[0]))
        self.bias = nn.Conv3d(channels[0], 1, 1)

    def forward(self, feats, dense, tokens, t_pos, t_mask, model_shape, stride, features: bool = False):
        n = len(feats)
        x = feats[-1]
        for i, lvl in enumerate(range(n - 2, -1, -1)):
            x = self.up[i](x) + feats[lvl]
            d = dense if lvl == 0 else F.avg_pool3d(dense, 2 ** lvl)
            x = x + self.dense[i](d)
            x = self.block[i](x)
            key = str(lvl)
            if key in self.attn:
                b, c = x.shape[:2]
                shp = tuple(x.shape[2:])
                pos = grid_positions(shp, 2 ** lvl, model_shape, stride, x.device, x.dtype).expand(b, -1, -1)
                flat = x.flatten(2).transpose(1, 2)
                flat = flat + self.attn[key](flat, tokens, pos, t_pos, t_mask)
                x = flat.transpose(1, 2).reshape(b, c, *shp)
        x = self.out_norm(x)
        w = self.hyper(tokens[:, 0])  # (B, C0)
        logits = torch.einsum("bc,bcdhw->bdhw", w, x).unsqueeze(1) + self.bias(x)
        return (logits, x) if features else logits
