"""SegResNet-style image encoder. It sees only the image, never the prompts, so its output can be cached."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ResBlock

__all__ = ["ImageEncoder"]


class ImageEncoder(nn.Module):
    """Stem conv, then per level: (stride-2 conv except level 0) + ``blocks[l]`` residual blocks.

    Args:
        in_channels: image channels. filters: channels at level 0, doubled per level.
        blocks: residual blocks per level; ``len(blocks)`` levels, so the latent stride is 2**(len(blocks)-1).
    forward: x (B, in, D, H, W) with D, H, W divisible by the stride -> list of ``len(blocks)`` tensors,
        level l of shape (B, filters*2**l, D/2**l, H/2**l, W/2**l), finest first.
    """

    def __init__(self, in_channels: int = 1, filters: int = 16, blocks: tuple[int, ...] = (1, 2, 2, 2),
                 norm: str = "instance") -> None:
        super().__init__()
        self.channels = [filters * 2 ** i for i in range(len(blocks))]
        self.stem = nn.Conv3d(in_channels, filters, 3, padding=1, bias=False)
        self.levels = nn.ModuleList()
        for i, nb in enumerate(blocks):
            down = nn.Identity() if i == 0 else nn.Conv3d(self.channels[i - 1], self.channels[i], 3, stride=2,
                                                          padding=1, bias=False)
            self.levels.append(nn.Sequential(down, *[ResBlock(self.channels[i], norm) for _ in range(nb)]))

    @property
    def stride(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats
