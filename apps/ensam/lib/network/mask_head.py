"""Several answers to one ambiguous prompt, and how good each one is (issue 27, "one click, one structure").

A lone click says "this voxel is in the object", not which object: the lobe, the organ, or the organ with its
neighbours. SAM answers such a prompt with several masks and a predicted quality for each; this is our version for
the 3D network. Mask 0 stays the decoder's own answer (its hypernetwork on output token 0), so weights trained
before this head answer exactly as before through mask 0; the head adds ``n_masks - 1`` masks, each its own
hypernetwork readout of the same full-resolution decoder features, and a quality head that predicts the DSC of
every mask from the prompt tokens and the mask's own statistics (soft size, share on the view's border, the
decoder features averaged inside it).

Shapes: x (B, C0, D, H, W) decoder features before the readout; tokens (B, T, dim) output tokens after the
transformer (token 0 drives the masks, token 1 the quality); logits (B, K, D, H, W); quality (B, K) DSC logits.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MultiMaskHead", "N_MASK_STATS"]

N_MASK_STATS = 3  # log soft size, share of the mask on the view's faces, mean confidence inside


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class MultiMaskHead(nn.Module):
    """``n_masks - 1`` extra mask readouts and a per-mask quality predictor (see the module docstring).

    Args:
        token_dim: prompt-token channels.
        channels: C0, the decoder's full-resolution feature channels.
        n_masks: masks in all (mask 0 is the decoder's own; this head makes the other ``n_masks - 1``).
    """

    def __init__(self, token_dim: int, channels: int, n_masks: int) -> None:
        super().__init__()
        if n_masks < 2:
            raise ValueError(f"a multi-mask head needs n_masks >= 2, not {n_masks}")
        self.n_masks = n_masks
        self.hyper = nn.ModuleList(_mlp(token_dim, token_dim, channels) for _ in range(n_masks - 1))
        self.bias = nn.Conv3d(channels, n_masks - 1, 1)
        self.quality = _mlp(2 * token_dim + channels + N_MASK_STATS, token_dim, 1)

    @torch.no_grad()
    def init_from(self, hyper: nn.Module, bias: nn.Conv3d, shifts) -> None:
        """Warm start: every extra mask a copy of mask 0's readout (``hyper``, ``bias``: the decoder's), its logits
        moved by ``shifts[k]`` (one per extra mask; negative: a smaller answer, positive: a larger one), so that the
        masks differ from the first step of training and the best-of-K loss has a choice to make."""
        if len(shifts) != self.n_masks - 1:
            raise ValueError(f"{self.n_masks - 1} shifts expected, got {len(shifts)}")
        for h in self.hyper:
            h.load_state_dict(hyper.state_dict())
        self.bias.weight.copy_(bias.weight.expand_as(self.bias.weight))
        self.bias.bias.copy_(bias.bias + torch.as_tensor(shifts, dtype=bias.bias.dtype))

    def masks(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The extra masks' logits (B, K - 1, D, H, W), before the prompt prior."""
        w = torch.stack([h(tokens[:, 0]) for h in self.hyper], dim=1)  # (B, K-1, C0)
        return torch.einsum("bkc,bcdhw->bkdhw", w, x) + self.bias(x)

    def features(self, x: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The quality head's input for every mask in ``logits`` (B, K, D, H, W): (B, K, 2 * dim + C0 + 3) = output
        tokens 0 and 1 (shared by the masks), the decoder features averaged inside the mask, and its statistics."""
        b, k = logits.shape[:2]
        p = torch.sigmoid(logits.float())
        n = p[0, 0].numel()
        size = p.flatten(2).sum(-1)  # (B, K)
        faces = torch.cat([p.select(d, i).flatten(2) for d in (2, 3, 4) for i in (0, -1)], dim=-1)
        border = faces.mean(-1)
        conf = (p * (2 * p - 1).abs()).flatten(2).sum(-1) / size.clamp(min=1.0)
        inside = torch.einsum("bkdhw,bcdhw->bkc", p, x.float()) / size.clamp(min=1.0)[..., None]
        stats = torch.stack([torch.log((size + 1.0) / n), border, conf], dim=-1)  # (B, K, 3)
        tok = tokens[:, :2].flatten(1).float()[:, None].expand(b, k, -1)
        return torch.cat([tok, inside, stats], dim=-1)

    def quality_of(self, feats: torch.Tensor) -> torch.Tensor:
        """Predicted DSC logits (B, K) from :meth:`features` (B, K, d)."""
        return self.quality(feats.to(self.quality[0].weight.dtype))[..., 0]

    def score(self, x: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Predicted DSC logits (B, K) of every mask in ``logits`` (B, K, D, H, W)."""
        return self.quality_of(self.features(x, tokens, logits))
