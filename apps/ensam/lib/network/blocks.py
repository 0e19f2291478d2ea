"""Convolutional building blocks shared by the encoder and the decoder (SegResNet style: norm -> ReLU -> conv,
residual)."""

from __future__ import annotations

from torch import nn

__all__ = ["ResBlock", "norm3d"]


def norm3d(channels: int, kind: str = "instance") -> nn.Module:
    """'instance' (InstanceNorm3d with affine) or 'group' (GroupNorm, 8 groups or fewer)."""
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r}")


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(relu(norm(conv(relu(norm(x)))))). (B,C,D,H,W) -> same."""

    def __init__(self, channels: int, norm: str = "instance", kernel_size: int = 3) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.body = nn.Sequential(
            norm3d(channels, norm), nn.ReLU(inplace=True), nn.Conv3d(channels, channels, kernel_size, padding=pad, bias=False),
            norm3d(channels, norm), nn.ReLU(inplace=True), nn.Conv3d(channels, channels, kernel_size, padding=pad, bias=False),
        )

    def forward(self, x):
        return x + self.body(x)
