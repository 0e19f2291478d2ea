"""xLSTM image encoder (issue 14): the SegResNet encoder's stages and channels, a bidirectional mLSTM block per level.

mLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", section 2.3 and appendix A.3), per head, for a
sequence of queries q_t, keys k_t (scaled by 1/sqrt(d_k)), values v_t and gate pre-activations i~_t, f~_t:

    C_t = f_t C_{t-1} + i_t k_t v_t^T          matrix memory, (d_k, d_v)
    n_t = f_t n_{t-1} + i_t k_t                normaliser, (d_k,)
    h_t = C_t^T q_t / max(|n_t^T q_t|, 1)
    i_t = exp(i~_t) (exponential input gate), f_t = sigmoid(f~_t)

computed in log space with the stabiliser m_t = max(log f_t + m_{t-1}, i~_t) (m_0 = -inf, C_0 = n_0 = 0): every
exponent is <= 0 and h_t = C'_t^T q_t / max(|n'_t^T q_t|, exp(-m_t)) with the stabilised states C'_t = C_t exp(-m_t).
Unrolled, that is the parallel form: with F_ts = sum_{s<j<=t} log f_j and D_ts = F_ts + i~_s (s <= t),
m_t = max_s D_ts and h_t = sum_s (q_t . k_s) exp(D_ts - m_t) v_s / max(|sum_s (q_t . k_s) exp(D_ts - m_t)|, exp(-m_t)).

:func:`mlstm_chunked` evaluates the parallel form inside chunks of ``chunk`` steps and carries the stabilised state
(C', n', m) across chunks by a work-efficient associative scan (2 log2(number of chunks) vectorised steps), so its
cost is linear in the sequence length and there is no Python loop over time; :func:`mlstm_recurrent` is the step-by-step
reference. Plain PyTorch ops, no custom kernels.

The block (:class:`XLSTMBlock`) flattens a feature map into a sequence with the slice axis outermost, normalises it and
splits it into two paths: linear + SiLU, and linear -> mLSTM run over the sequence and over the sequence flipped along
the slice axis (shared weights; the flipped output is flipped back and added, so every slice sees the slices on both
sides). The paths are merged by multiplication, projected by a final linear layer and added to the input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import norm3d
from .encoder import ImageEncoder

__all__ = ["mlstm_chunked", "mlstm_recurrent", "MLSTM", "XLSTMBlock", "XLSTMEncoder"]

# stands in for the -inf stabiliser of the empty state: exp(NEG + x) == 0 for every finite x of a float32 network,
# without the inf - inf = nan that a true -inf gives in differences
NEG = -1e30


def _check(q, k, v, igate, fgate):
    b, h, n, dk = q.shape
    if k.shape != q.shape or v.shape[:3] != (b, h, n) or igate.shape != (b, h, n) or fgate.shape != (b, h, n):
        raise ValueError(f"mLSTM shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"igate {tuple(igate.shape)}, fgate {tuple(fgate.shape)}")


def mlstm_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, igate: torch.Tensor,
                    fgate: torch.Tensor) -> torch.Tensor:
    """The mLSTM one step at a time (the reference for :func:`mlstm_chunked`; slow: a Python loop over L).

    q, k (B, H, L, Dk); v (B, H, L, Dv); igate, fgate (B, H, L) gate pre-activations -> h~ (B, H, L, Dv)
    (before the output gate). Computed in float32.
    """
    _check(q, k, v, igate, fgate)
    b, h, n, dk = q.shape
    q, k, v, igate = q.float(), k.float() / math.sqrt(dk), v.float(), igate.float()
    logf = F.logsigmoid(fgate.float())
    mem = q.new_zeros(b, h, dk, v.shape[-1])
    norm = q.new_zeros(b, h, dk)
    m = q.new_full((b, h), NEG)
    out = []
    for t in range(n):
        m_new = torch.maximum(logf[..., t] + m, igate[..., t])
        decay = torch.exp(logf[..., t] + m - m_new)
        write = torch.exp(igate[..., t] - m_new)
        kt = k[:, :, t]
        mem = decay[..., None, None] * mem + write[..., None, None] * kt[..., :, None] * v[:, :, t, None, :]
        norm = decay[..., None] * norm + write[..., None] * kt
        qt = q[:, :, t]
        num = torch.einsum("bhd,bhde->bhe", qt, mem)
        den = (qt * norm).sum(-1).abs()
        out.append(num / torch.maximum(den, torch.exp(-m_new))[..., None])
        m = m_new
    return torch.stack(out, dim=2)


def _combine(d1, m1, s1, d2, m2, s2):
    """Two consecutive ranges of steps, earlier (1) then later (2), as one: each is (d: total log forget (...,),
    m: stabiliser (...,), s: stabilised state (..., Dk, E), true state = s * exp(m))."""
    m = torch.maximum(d2 + m1, m2)
    s = torch.exp(d2 + m1 - m)[..., None, None] * s1 + torch.exp(m2 - m)[..., None, None] * s2
    return d1 + d2, m, s


def _scan(d: torch.Tensor, m: torch.Tensor, s: torch.Tensor):
    """Inclusive scan of :func:`_combine` along the chunk axis: d, m (..., N), s (..., N, Dk, E) -> the same shapes,
    element n covering chunks 0..n. Work-efficient (pairs, recursion on N/2, then the even elements): about 2N
    combinations in 2 log2(N) vectorised steps."""
    n = d.shape[-1]
    if n == 1:
        return d, m, s
    if n % 2:  # one identity element (no decay, empty state) makes pairs
        d, m, s = F.pad(d, (0, 1)), F.pad(m, (0, 1), value=NEG), F.pad(s, (0, 0, 0, 0, 0, 1))
    de, do = d[..., 0::2], d[..., 1::2]
    me, mo = m[..., 0::2], m[..., 1::2]
    se, so = s[..., 0::2, :, :], s[..., 1::2, :, :]
    pd, pm, ps = _scan(*_combine(de, me, se, do, mo, so))  # the prefixes ending at the odd elements
    ed, em, es = _combine(pd[..., :-1], pm[..., :-1], ps[..., :-1, :, :], de[..., 1:], me[..., 1:], se[..., 1:, :, :])
    ed, em = torch.cat([de[..., :1], ed], -1), torch.cat([me[..., :1], em], -1)
    es = torch.cat([se[..., :1, :, :], es], -3)
    d = torch.stack([ed, pd], -1).flatten(-2)[..., :n]
    m = torch.stack([em, pm], -1).flatten(-2)[..., :n]
    s = torch.stack([es, ps], -3).flatten(-4, -3)[..., :n, :, :]
    return d, m, s


def _scan_states(decay: torch.Tensor, m: torch.Tensor, state: torch.Tensor):
    """The stabilised state entering each chunk, from the chunks' own contributions.

    decay (..., N): each chunk's total log forget; m (..., N): the stabiliser of its contribution; state
    (..., N, Dk, E): its contribution, stabilised (true = state * exp(m)). Returns (m_in (..., N), state_in
    (..., N, Dk, E)), the first being the empty state (m = NEG, zeros): an exclusive scan of :func:`_combine`.
    """
    _, m, state = _scan(decay, m, state)
    m_in = torch.cat([torch.full_like(m[..., :1], NEG), m[..., :-1]], dim=-1)
    state_in = torch.cat([torch.zeros_like(state[..., :1, :, :]), state[..., :-1, :, :]], dim=-3)
    return m_in, state_in


def mlstm_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, igate: torch.Tensor, fgate: torch.Tensor,
                  chunk: int = 32) -> torch.Tensor:
    """The mLSTM, chunkwise: the parallel (stabilised) form inside chunks of ``chunk`` steps, the state across chunks
    by an associative scan. Equal to :func:`mlstm_recurrent` up to float rounding.

    q, k (B, H, L, Dk); v (B, H, L, Dv); igate, fgate (B, H, L) gate pre-activations -> h~ (B, H, L, Dv) in q's
    dtype (computed in float32). Memory ~ B*H*L*chunk floats for the within-chunk matrices.
    """
    _check(q, k, v, igate, fgate)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, not {chunk}")
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    c = min(chunk, n)
    nc = -(-n // c)
    pad = nc * c - n
    q, k, v, igate = q.float(), k.float() / math.sqrt(dk), v.float(), igate.float()
    logf = F.logsigmoid(fgate.float())
    # the normaliser rides along as one more value channel of ones: n_t^T q_t is then the last output column
    v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    if pad:  # steps after the end of the sequence: they change no earlier output (causal) and are cropped
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        igate, logf = (F.pad(t, (0, pad)) for t in (igate, logf))
    q, k, v = (t.reshape(b, h, nc, c, t.shape[-1]) for t in (q, k, v))  # (B, H, N, c, .)
    igate, logf = igate.reshape(b, h, nc, c), logf.reshape(b, h, nc, c)
    cum = logf.cumsum(-1)  # (B, H, N, c): log forget from the chunk start through step t, inclusive
    total = cum[..., -1]  # (B, H, N)
    # within the chunk the log weight of step s in the output of step t (s <= t) is cum_t + g_s
    g = igate - cum  # (B, H, N, c)
    ref = g.amax(-1, keepdim=True)  # (B, H, N, 1): the chunk's reference, so exp(g_s - ref) <= 1
    # the chunk's contribution to its end state: log weight total + g_s
    inc = torch.einsum("bhncd,bhnce->bhnde", k * torch.exp(g - ref)[..., None], v)  # stabilised by total + ref
    m_in, state_in = _scan_states(total, total + ref[..., 0], inc)  # (B, H, N), (B, H, N, Dk, Dv + 1)
    # the stabiliser m_t = max(cum_t + m_in, cum_t + max_{s<=t} g_s), without a (c, c) matrix
    m = cum + torch.maximum(m_in[..., None], g.cummax(-1).values)  # (B, H, N, c)
    # the weight of step s in the output of step t: exp(cum_t + g_s - m_t) <= 1 for s <= t (by m_t's definition)
    logw = (cum - m)[..., :, None] + g[..., None, :]  # (B, H, N, c, c)
    future = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
    scores = (q @ k.transpose(-1, -2)) * torch.exp(logw.masked_fill(future, float("-inf")))  # (B, H, N, c, c)
    out = scores @ v + (q * torch.exp(cum + m_in[..., None] - m)[..., None]) @ state_in  # (B, H, N, c, Dv + 1)
    hid = out[..., :dv] / torch.maximum(out[..., dv].abs(), torch.exp(-m))[..., None]
    return hid.reshape(b, h, nc * c, dv)[:, :, :n].to(dtype)


class MLSTM(nn.Module):
    """Multi-head mLSTM layer: (B, L, dim) -> (B, L, dim).

    Args:
        dim: channels in and out (``heads`` must divide it; each head has dim/heads query/key/value channels).
        heads: mLSTM heads (one matrix memory each; input and forget gates are per head, the output gate per channel).
        chunk: steps per chunk of :func:`mlstm_chunked` (memory ~ L * chunk per head; no effect on the result).
    The hidden state is normalised per head (layer norm with a learned per-channel scale) before the output gate.
    """

    def __init__(self, dim: int, heads: int = 1, chunk: int = 32) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.dim, self.heads, self.chunk = dim, heads, chunk
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.gates = nn.Linear(dim, 2 * heads)  # input, forget pre-activations per head
        self.out_gate = nn.Linear(dim, dim)
        self.head_scale = nn.Parameter(torch.ones(dim))
        with torch.no_grad():  # xLSTM's initialisation: gates start from their biases; long memory (f ~ 0.95..1)
            self.gates.weight.zero_()
            self.gates.bias[:heads].normal_(0.0, 0.1)
            self.gates.bias[heads:].copy_(torch.linspace(3.0, 6.0, heads))

    def forward(self, x: torch.Tensor, recurrent: bool = False) -> torch.Tensor:
        """x (B, L, dim) -> (B, L, dim); ``recurrent`` uses the step-by-step reference (tests)."""
        b, n, _ = x.shape
        hd = self.dim // self.heads
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # each (B, H, L, hd)
        ig, fg = self.gates(x).view(b, n, 2, self.heads).permute(2, 0, 3, 1)  # each (B, H, L)
        with torch.autocast(device_type=x.device.type, enabled=False):  # the exponentials stay in float32
            if recurrent:
                hid = mlstm_recurrent(q, k, v, ig, fg)
            else:
                hid = mlstm_chunked(q, k, v, ig, fg, self.chunk)
            hid = F.layer_norm(hid, (hd,))
        hid = hid.to(x.dtype).permute(0, 2, 1, 3).reshape(b, n, self.dim) * self.head_scale
        return torch.sigmoid(self.out_gate(x)) * hid


def slice_flip(seq: torch.Tensor, slices: int) -> torch.Tensor:
    """seq (B, L, C) ordered slice-major (L = slices * voxels per slice) -> the same with the slice order reversed
    (each slice's own voxel order kept). Its own inverse."""
    return seq.unflatten(1, (slices, -1)).flip(1).flatten(1, 2)


class XLSTMBlock(nn.Module):
    """The xLSTM block of one encoder level: (B, C, D, H, W) -> same shape.

    seq = flatten(x) with ``slice_axis`` outermost (B, L, C); y = LayerNorm(seq);
    out = seq + W_out[(SiLU(W_z y)) * (mLSTM(W_u y) + flip(mLSTM(flip(W_u y))))], flip = reverse the slice order.

    Args:
        channels: C. heads: mLSTM heads (must divide C). chunk: mLSTM chunk length.
        slice_axis: the spatial axis (0, 1, 2 or -3, -2, -1 of D, H, W) whose order the backward pass reverses;
            default the last (k of an [i, j, k] image: the slice axis of axial NIfTI/DICOM volumes).
        bidirectional: False runs the forward direction only (for ablations and the tests).
    """

    def __init__(self, channels: int, heads: int = 1, chunk: int = 32, slice_axis: int = -1,
                 bidirectional: bool = True) -> None:
        super().__init__()
        if slice_axis not in (0, 1, 2, -1, -2, -3):
            raise ValueError(f"slice_axis must be a spatial axis (0..2 or -3..-1), not {slice_axis}")
        self.slice_axis = slice_axis % 3
        self.bidirectional = bidirectional
        self.norm = nn.LayerNorm(channels)
        self.gate = nn.Linear(channels, channels)
        self.inp = nn.Linear(channels, channels)
        self.mlstm = MLSTM(channels, heads, chunk)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        axis = 2 + self.slice_axis
        xs = x.movedim(axis, 2)  # (B, C, S, P, Q): slices first
        grid = xs.shape[2:]
        seq = xs.flatten(2).transpose(1, 2)  # (B, L, C), slice-major
        y = self.norm(seq)
        z = F.silu(self.gate(y))
        u = self.inp(y)
        if self.bidirectional:  # both directions in one batch (shared weights)
            hid = self.mlstm(torch.cat([u, slice_flip(u, grid[0])], dim=0))
            hid = hid[:b] + slice_flip(hid[b:], grid[0])
        else:
            hid = self.mlstm(u)
        seq = seq + self.out(z * hid)
        return seq.transpose(1, 2).reshape(b, c, *grid).movedim(2, axis)


class XLSTMEncoder(ImageEncoder):
    """Drop-in for :class:`~lib.network.encoder.ImageEncoder` (same levels, channels, strides, outputs and forward).

    Level l: (stride-2 conv except level 0, whose conv is ``stem``) -> norm -> LeakyReLU -> ``blocks[l]`` xLSTM blocks.

    Args:
        in_channels: image channels. filters: channels at level 0, doubled per level.
        blocks: xLSTM blocks per level; ``len(blocks)`` levels, latent stride 2**(len(blocks)-1).
        norm: 'instance' or 'group' (after each conv). head_dim: channels per mLSTM head (heads = C // head_dim,
            at least 1, lowered until it divides C). chunk: mLSTM chunk length. slice_axis: see :class:`XLSTMBlock`.
    forward: x (B, in, D, H, W) with D, H, W divisible by the stride -> list of ``len(blocks)`` tensors, level l of
        shape (B, filters*2**l, D/2**l, H/2**l, W/2**l), finest first (any D, H, W works; odd sizes round up).
    """

    def __init__(self, in_channels: int = 1, filters: int = 16, blocks: tuple[int, ...] = (1, 2, 2, 2),
                 norm: str = "instance", head_dim: int = 16, chunk: int = 32, slice_axis: int = -1) -> None:
        nn.Module.__init__(self)  # ImageEncoder's layers are replaced, its stride and forward kept
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, not {head_dim}")
        self.channels = [filters * 2 ** i for i in range(len(blocks))]
        self.stem = nn.Conv3d(in_channels, filters, 3, padding=1, bias=False)
        self.levels = nn.ModuleList()
        for i, nb in enumerate(blocks):
            ch = self.channels[i]
            heads = max(1, ch // head_dim)
            while ch % heads:
                heads -= 1
            down = nn.Identity() if i == 0 else nn.Conv3d(self.channels[i - 1], ch, 3, stride=2, padding=1,
                                                          bias=False)
            self.levels.append(nn.Sequential(down, norm3d(ch, norm), nn.LeakyReLU(0.01, inplace=True),
                                             *[XLSTMBlock(ch, heads, chunk, slice_axis) for _ in range(nb)]))
