"""ENSAM: Equivariant, Normalized, Segment Anything Model (our implementation; see docs/ARCHITECTURE.md).

image -> ImageEncoder (cacheable) -> latent + dense prompts -> TwoWayTransformer with prompt tokens (rotary
relative positions, QK-normalised attention) -> UNetDecoder (skips, dense prompts at every scale; SAMU adds
prompt cross-attention at every decoder scale) -> one logit map; with ``n_masks`` > 1 also a MultiMaskHead (several
answers to an ambiguous prompt and a predicted DSC for each, lib/network/mask_head.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .attention import TwoWayTransformer
from .decoder import UNetDecoder, grid_positions
from .encoder import ImageEncoder
from .mask_head import MultiMaskHead
from .prompt_encoder import N_DENSE, FourierPositions, PromptEncoder
from .xlstm import XLSTMEncoder

__all__ = ["NetworkConfig", "EnsamNet", "build_network", "add_mask_head"]


@dataclass
class NetworkConfig:
    """Every size of the network. ``variant``: 'ensam' (prompt attention at the latent level only) or 'samu'
    (also at every decoder scale). ``positional``: 'rotary' (relative) or 'absolute' (Fourier features).
    ``prompt_prior``: initial scale of the prompt-prior residual added to the logits (0 = none; see EnsamNet).
    ``lone_click_prior``: the prior of a prompt with no region (no box, no previous mask: clicks only):
    'negative' (release 1-3: -s everywhere but the click blobs, which held a lone click on the liver to a blob of
    ~1000 voxels) or 'neutral' (only +s on the foreground blobs and -s on the background blobs).
    ``encoder``: 'segresnet' (residual conv blocks) or 'xlstm' (per level conv, norm, LeakyReLU, then bidirectional
    mLSTM blocks, lib/network/xlstm.py; same levels, channels and outputs); ``xlstm_head_dim`` (channels per mLSTM
    head) and ``xlstm_chunk`` (mLSTM chunk length; compute only, no effect on weights or results) are its sizes.
    ``n_masks``: answers per prompt (1: the decoder's one; K > 1 adds a :class:`MultiMaskHead` with K - 1 more masks
    and a predicted DSC for each, :meth:`EnsamNet.decode_masks`; :meth:`EnsamNet.decode` answers mask 0 either
    way)."""

    in_channels: int = 1
    filters: int = 16
    blocks: tuple[int, ...] = (1, 2, 2, 2)
    heads: int = 4
    depth: int = 2
    mlp_ratio: float = 2.0
    num_labels: int = 128
    n_output_tokens: int = 2
    norm: str = "instance"
    variant: str = "ensam"
    positional: str = "rotary"
    roi_size: tuple[int, int, int] = (64, 64, 64)
    prompt_prior: float = 2.0
    lone_click_prior: str = "negative"
    encoder: str = "segresnet"
    xlstm_head_dim: int = 16
    xlstm_chunk: int = 32
    n_masks: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)


class EnsamNet(nn.Module):
    """See module docstring. Shapes: image (B, in, D, H, W), any D, H, W (padded internally to a multiple of
    the latent stride ``2 ** (len(blocks) - 1)``; the logits are cropped back)."""

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__()
        cfg = config or NetworkConfig()
        if cfg.variant not in ("ensam", "samu"):
            raise ValueError(f"variant must be 'ensam' or 'samu', not {cfg.variant!r}")
        if cfg.lone_click_prior not in ("negative", "neutral"):
            raise ValueError(f"lone_click_prior must be 'negative' or 'neutral', not {cfg.lone_click_prior!r}")
        if cfg.positional not in ("rotary", "absolute"):
            raise ValueError(f"positional must be 'rotary' or 'absolute', not {cfg.positional!r}")
        if cfg.encoder not in ("segresnet", "xlstm"):
            raise ValueError(f"encoder must be 'segresnet' or 'xlstm', not {cfg.encoder!r}")
        self.config = cfg
        if cfg.encoder == "xlstm":
            self.encoder = XLSTMEncoder(cfg.in_channels, cfg.filters, cfg.blocks, cfg.norm, cfg.xlstm_head_dim,
                                        cfg.xlstm_chunk)
        else:
            self.encoder = ImageEncoder(cfg.in_channels, cfg.filters, cfg.blocks, cfg.norm)
        ch = self.encoder.channels
        dim = ch[-1]
        rotary = cfg.positional == "rotary"
        self.prompt_encoder = PromptEncoder(dim, cfg.num_labels, cfg.n_output_tokens)
        self.latent_dense = nn.Conv3d(N_DENSE, dim, 1)
        self.abs_pos = None if rotary else FourierPositions(dim)
        self.transformer = TwoWayTransformer(dim, cfg.heads, cfg.depth, cfg.mlp_ratio, rotary=rotary)
        levels = tuple(range(len(ch) - 1)) if cfg.variant == "samu" else ()
        self.decoder = UNetDecoder(ch, dim, norm=cfg.norm, attention_levels=levels, rotary=rotary)
        # logits = decoder + s * (2 * prior - 1), prior = max(prev mask, box, fg clicks) - bg clicks: the network
        # starts from "fill the box / keep the previous mask" and learns the correction (no collapse to empty
        # masks early in training, when objects fill a few % of the ROI). ``s`` is learned.
        self.prior_scale = nn.Parameter(torch.tensor(float(cfg.prompt_prior))) if cfg.prompt_prior else None
        if cfg.n_masks > 1 and cfg.n_output_tokens < 2:
            raise ValueError("n_masks > 1 needs n_output_tokens >= 2 (token 1 drives the quality prediction)")
        self.mask_head = MultiMaskHead(dim, ch[0], cfg.n_masks) if cfg.n_masks > 1 else None

    @property
    def stride(self) -> int:
        return self.encoder.stride

    def _pad(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Pad the high end of each spatial axis up to a multiple of the latent stride."""
        s = self.stride
        pad = []
        for d in reversed(x.shape[2:]):
            pad += [0, (-d) % s]
        return F.pad(x, pad, mode=mode) if any(pad) else x

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """image (B, in, D, H, W), any size -> encoder features, finest first (level l has ceil(D / 2**l)...
        voxels after padding the high end to a multiple of the stride). Independent of prompts (cacheable)."""
        return self.encoder(self._pad(image, "replicate"))

    def decode(self, feats: list[torch.Tensor], points: torch.Tensor, point_types: torch.Tensor,
               dense: torch.Tensor, label_ids: torch.Tensor | None = None) -> torch.Tensor:
        """feats from :meth:`encode`; points (B, N, 3) model-grid voxels; point_types (B, N) (-1 = padding);
        dense (B, 4, D, H, W); label_ids (B,) or None. Returns logits (B, 1, D, H, W) (mask 0)."""
        logits, _, _, offset, out_shape = self._decode(feats, points, point_types, dense, label_ids)
        return self._finish(logits, offset, out_shape)

    def decode_masks(self, feats: list[torch.Tensor], points: torch.Tensor, point_types: torch.Tensor,
                     dense: torch.Tensor, label_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every answer of a network with ``n_masks`` > 1: (logits (B, K, D, H, W), predicted DSC logits (B, K)).
        Mask 0 is :meth:`decode`'s answer. The quality is read on the padded grid the network works on."""
        if self.mask_head is None:
            raise ValueError("this network has one mask (n_masks = 1): use decode()")
        logits, x, tokens, offset, out_shape = self._decode(feats, points, point_types, dense, label_ids)
        logits = self.head_masks(logits, x, tokens, offset)
        quality = self.mask_head.score(x, tokens, logits)
        return logits[:, :, : out_shape[0], : out_shape[1], : out_shape[2]], quality

    def head_masks(self, logits0: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor,
                   offset: torch.Tensor | None) -> torch.Tensor:
        """Every mask's logits (B, K, *padded grid) from :meth:`_decode`'s parts: mask 0's, then the head's, each
        with the prompt prior."""
        logits = torch.cat([logits0, self.mask_head.masks(x, tokens)], dim=1)
        return logits + self.prior_scale * offset if offset is not None else logits

    def _decode(self, feats, points, point_types, dense, label_ids):
        """The shared part of :meth:`decode` and :meth:`decode_masks`: (mask 0's logits before the prompt prior,
        the decoder's full-resolution features, the output tokens, the prior's offset map or None, the unpadded
        shape), all on the padded grid."""
        out_shape = tuple(dense.shape[2:])
        dense = self._pad(dense, "constant")
        model_shape = tuple(dense.shape[2:])
        s = self.stride
        latent = feats[-1]
        b, c = latent.shape[:2]
        lshape = tuple(latent.shape[2:])
        latent = latent + self.latent_dense(F.avg_pool3d(dense, s))
        img = latent.flatten(2).transpose(1, 2)  # (B, L, C)
        i_pos = grid_positions(lshape, s, model_shape, s, img.device, img.dtype).expand(b, -1, -1)
        tokens, t_pos, t_mask = self.prompt_encoder(points, point_types, label_ids, model_shape, s)
        if self.abs_pos is not None:
            img = img + self.abs_pos(i_pos)
            tokens = tokens + self.abs_pos(t_pos) * t_mask[..., None].to(tokens.dtype)
        tokens, img = self.transformer(tokens, img, t_pos, i_pos, t_mask)
        latent = img.transpose(1, 2).reshape(b, c, *lshape)
        logits, x = self.decoder([*feats[:-1], latent], dense, tokens, t_pos, t_mask, model_shape, s, features=True)
        offset = None
        if self.prior_scale is not None:
            prior = (dense[:, 0:3].amax(dim=1, keepdim=True) - dense[:, 3:4]).clamp(0, 1)
            offset = 2 * prior - 1
            if self.config.lone_click_prior == "neutral":
                # no region (box / previous mask) in a sample: the clicks alone, no "-s everywhere else"
                region = dense[:, 0:2].flatten(1).amax(dim=1) > 0  # (B,)
                clicks = dense[:, 2:3] - dense[:, 3:4]
                offset = torch.where(region[:, None, None, None, None], offset, clicks)
        return logits, x, tokens, offset, out_shape

    def _finish(self, logits, offset, out_shape):
        if offset is not None:
            logits = logits + self.prior_scale * offset
        return logits[:, :, : out_shape[0], : out_shape[1], : out_shape[2]]

    def forward(self, image, points, point_types, dense, label_ids=None):
        return self.decode(self.encode(image), points, point_types, dense, label_ids)


def build_network(config: NetworkConfig | dict | None = None) -> EnsamNet:
    if isinstance(config, dict):
        config = NetworkConfig.from_dict(config)
    return EnsamNet(config)


def add_mask_head(net: EnsamNet, n_masks: int = 3, shifts=None) -> EnsamNet:
    """A network with ``n_masks`` answers whose mask 0 is ``net`` unchanged: the same weights in a network with a
    :class:`MultiMaskHead`, warm-started from ``net``'s readout (:meth:`MultiMaskHead.init_from`, one logit shift per
    extra mask; default evenly from -1.5 to +1.5). Returns the new network (on ``net``'s device); ``net`` is left as it is."""
    cfg = NetworkConfig.from_dict({**net.config.to_dict(), "n_masks": int(n_masks)})
    out = EnsamNet(cfg).to(next(net.parameters()).device)
    missing, unexpected = out.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not k.startswith("mask_head.") for k in missing):
        raise ValueError(f"cannot add a mask head: unexpected {unexpected}, missing {missing}")
    if shifts is None:
        shifts = torch.linspace(-1.5, 1.5, int(n_masks) - 1).tolist()
    out.mask_head.init_from(out.decoder.hyper, out.decoder.bias, list(shifts))
    return out
