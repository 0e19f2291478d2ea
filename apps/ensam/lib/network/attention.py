"""Normalised attention with 3D rotary (relative) positions, and the two-way prompt/image transformer.

Shapes use B = batch, T = prompt tokens, L = image tokens (latent voxels), C = channels.
Positions are 3-vectors in *latent voxel units* with the origin at the grid centre, so that a token with
position 0 and an image token interact through an offset only, for any grid size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Rotary3D", "NormalizedAttention", "TwoWayBlock", "TwoWayTransformer"]


class Rotary3D(nn.Module):
    """3D rotary position embedding on the first ``rot_dim`` channels of each head.

    The rotated channels are split in three equal groups, one per axis; within a group, channel pairs are
    rotated by ``pos[axis] * freq``. Dot products between rotated queries and keys then depend only on the
    offset between their positions (relative positions). The remaining ``head_dim - rot_dim`` channels are
    left as they are, so tokens can also attend by content alone.

    Args:
        head_dim: channels per head.
        rot_fraction: share of ``head_dim`` that is rotated (rounded down to a multiple of 6).
        min_wavelength / max_wavelength: range of wavelengths in latent voxels (geometric spacing).
    """

    def __init__(self, head_dim: int, rot_fraction: float = 0.75, min_wavelength: float = 1.5,
                 max_wavelength: float = 64.0) -> None:
        super().__init__()
        rot_dim = int(head_dim * rot_fraction) // 6 * 6
        self.rot_dim = rot_dim
        n_freq = rot_dim // 6  # pairs per axis
        if n_freq > 0:
            wl = torch.logspace(math.log10(min_wavelength), math.log10(max_wavelength), n_freq)
            freqs = 2 * math.pi / wl
        else:
            freqs = torch.zeros(0)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, heads, N, head_dim), pos (B, N, 3) -> rotated x (same shape)."""
        if self.rot_dim == 0:
            return x
        b, h, n, d = x.shape
        # in float32 whatever the autocast: in bf16 (8-bit mantissa) pos * freq loses the sub-voxel offsets that
        # place a click (the angle of a latent position ~6 is off by up to 0.125 rad), and the error grows with
        # the position, so relative positions stop being relative
        with torch.autocast(device_type=x.device.type, enabled=False):
            ang = pos.float().unsqueeze(-1) * self.freqs.float()  # (B, N, 3, F)
            ang = ang.reshape(b, 1, n, -1)  # (B, 1, N, 3F)
            cos, sin = ang.cos(), ang.sin()
            xr = x[..., : self.rot_dim].float().reshape(b, h, n, -1, 2)
            x1, x2 = xr[..., 0], xr[..., 1]
            rot = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).reshape(b, h, n, self.rot_dim)
        return torch.cat((rot.to(x.dtype), x[..., self.rot_dim:]), dim=-1)


class NormalizedAttention(nn.Module):
    """Multi-head attention with QK-normalisation (cosine attention with a learned per-head temperature) and
    optional 3D rotary positions.

    Args:
        dim: query/output channels. kv_dim: key/value input channels (default ``dim``).
        heads: number of heads; ``inner_dim`` (default ``dim``) must divide by ``heads``.
        rotary: apply :class:`Rotary3D` to queries and keys (needs positions in ``forward``).
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, inner_dim: int | None = None,
                 rotary: bool = True, init_scale: float = 10.0) -> None:
        super().__init__()
        kv_dim = kv_dim or dim
        inner_dim = inner_dim or dim
        if inner_dim % heads:
            raise ValueError(f"inner_dim {inner_dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, inner_dim // heads
        self.q = nn.Linear(dim, inner_dim)
        self.k = nn.Linear(kv_dim, inner_dim)
        self.v = nn.Linear(kv_dim, inner_dim)
        self.out = nn.Linear(inner_dim, dim)
        self.log_scale = nn.Parameter(torch.full((heads, 1, 1), math.log(init_scale)))
        self.rotary = Rotary3D(self.head_dim) if rotary else None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, x_pos: torch.Tensor | None = None,
                kv_pos: torch.Tensor | None = None, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, Nq, dim), kv (B, Nk, kv_dim), positions (B, N*, 3), kv_mask (B, Nk) bool, True = attend.

        Returns (B, Nq, dim).
        """
        q, k, v = self._split(self.q(x)), self._split(self.k(kv)), self._split(self.v(kv))
        q = F.normalize(q, dim=-1) * self.log_scale.exp().clamp(max=100.0)
        k = F.normalize(k, dim=-1)
        if self.rotary is not None and x_pos is not None and kv_pos is not None:
            q, k = self.rotary(q, x_pos), self.rotary(k, kv_pos)
        mask = None if kv_mask is None else kv_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        b, h, n, d = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, h * d))


class _MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class TwoWayBlock(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention
    (pre-norm residual blocks).

    tokens (B, T, C), image (B, L, C), positions (B, T, 3) / (B, L, 3), token_mask (B, T) bool.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, rotary: bool = True) -> None:
        super().__init__()
        self.n1, self.self_attn = nn.LayerNorm(dim), NormalizedAttention(dim, heads, rotary=rotary)
        self.n2, self.t2i = nn.LayerNorm(dim), NormalizedAttention(dim, heads, rotary=rotary)
        self.n3, self.mlp = nn.LayerNorm(dim), _MLP(dim, int(dim * mlp_ratio))
        self.n4, self.i2t = nn.LayerNorm(dim), NormalizedAttention(dim, heads, rotary=rotary)
        self.n_img = nn.LayerNorm(dim)

    def forward(self, tokens, image, t_pos, i_pos, token_mask):
        t = self.n1(tokens)
        tokens = tokens + self.self_attn(t, t, t_pos, t_pos, token_mask)
        tokens = tokens + self.t2i(self.n2(tokens), self.n_img(image), t_pos, i_pos)
        tokens = tokens + self.mlp(self.n3(tokens))
        image = image + self.i2t(self.n4(image), tokens, i_pos, t_pos, token_mask)
        return tokens, image


class TwoWayTransformer(nn.Module):
    """``depth`` :class:`TwoWayBlock` s and a final token->image attention. Returns (tokens, image)."""

    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float = 2.0, rotary: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TwoWayBlock(dim, heads, mlp_ratio, rotary) for _ in range(depth))
        self.n_final, self.final = nn.LayerNorm(dim), NormalizedAttention(dim, heads, rotary=rotary)
        self.n_img = nn.LayerNorm(dim)

    def forward(self, tokens, image, t_pos, i_pos, token_mask):
        for blk in self.blocks:
            tokens, image = blk(tokens, image, t_pos, i_pos, token_mask)
        tokens = tokens + self.final(self.n_final(tokens), self.n_img(image), t_pos, i_pos)
        return tokens, image
