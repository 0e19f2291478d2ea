"""The ENSAM / SAMU network: shapes for odd and non-cubic inputs, prompt independence of the encoding,
relative (rotary) positions, every size an argument."""

import pytest
import torch

from lib.network import BG, BOX_MAX, BOX_MIN, FG, NetworkConfig, build_network, dense_prompt_maps
from lib.network.attention import Rotary3D

torch.set_num_threads(1)
SMALL = dict(filters=4, blocks=(1, 1, 1), heads=2, depth=1)


def _prompts(shape):
    pts = torch.tensor([[[5.0, 6.0, 7.0], [1.0, 1.0, 1.0], [10.0, 12.0, 14.0], [3.0, 3.0, 3.0]]])
    types = torch.tensor([[FG, BOX_MIN, BOX_MAX, BG]])
    return pts, types, dense_prompt_maps(pts, types, shape)


@pytest.mark.parametrize("variant,positional", [("ensam", "rotary"), ("samu", "rotary"), ("ensam", "absolute")])
@pytest.mark.parametrize("shape", [(17, 23, 9), (16, 16, 16), (33, 20, 12)])
def test_output_shape_any_size(variant, positional, shape):
    net = build_network(NetworkConfig(**SMALL, variant=variant, positional=positional)).eval()
    pts, types, dense = _prompts(shape)
    with torch.no_grad():
        y = net(torch.randn(1, 1, *shape), pts, types, dense)
    assert y.shape == (1, 1, *shape)
    assert torch.isfinite(y).all()


def test_encoding_does_not_depend_on_prompts_and_decode_does():
    net = build_network(NetworkConfig(**SMALL)).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        f1 = net.encode(x)
        f2 = net.encode(x)
        pts, types, dense = _prompts((16, 16, 16))
        a = net.decode(f1, pts, types, dense)
        b = net.decode(f2, pts[:, :1], types[:, :1], dense_prompt_maps(pts[:, :1], types[:, :1], (16, 16, 16)))
    assert all(torch.equal(u, v) for u, v in zip(f1, f2))
    assert not torch.allclose(a, b)  # the prompts change the output


def test_padding_tokens_are_ignored():
    net = build_network(NetworkConfig(**SMALL)).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    pts, types, dense = _prompts((16, 16, 16))
    padded_pts = torch.cat([pts, torch.full((1, 2, 3), 99.0)], dim=1)
    padded_types = torch.cat([types, torch.full((1, 2), -1)], dim=1)
    with torch.no_grad():
        a = net(x, pts, types, dense)
        b = net(x, padded_pts, padded_types, dense)
    assert torch.allclose(a, b, atol=1e-5)


def test_label_token_changes_the_prompt_free_output():
    net = build_network(NetworkConfig(**SMALL, num_labels=10)).eval()
    with torch.no_grad():
        nn_ = torch.nn.init
        nn_.normal_(net.prompt_encoder.label_embed.weight)
        x = torch.randn(1, 1, 16, 16, 16)
        empty_p, empty_t = torch.zeros(1, 0, 3), torch.zeros(1, 0, dtype=torch.long)
        dense = torch.zeros(1, 4, 16, 16, 16)
        a = net(x, empty_p, empty_t, dense, torch.tensor([1]))
        b = net(x, empty_p, empty_t, dense, torch.tensor([2]))
    assert not torch.allclose(a, b)


def test_rotary_dot_products_depend_only_on_offsets():
    rot = Rotary3D(head_dim=24, rot_fraction=1.0)
    q, k = torch.randn(1, 1, 1, 24), torch.randn(1, 1, 1, 24)
    p1, p2 = torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[4.0, -1.0, 0.5]]])
    shift = torch.tensor([[[7.5, -3.0, 2.0]]])
    d1 = (rot(q, p1) * rot(k, p2)).sum()
    d2 = (rot(q, p1 + shift) * rot(k, p2 + shift)).sum()
    d3 = (rot(q, p1) * rot(k, p2 + shift)).sum()
    assert torch.allclose(d1, d2, atol=1e-4)
    assert not torch.allclose(d1, d3, atol=1e-3)


def test_sizes_are_arguments_and_parameter_count_scales():
    small = build_network(NetworkConfig(filters=4, blocks=(1, 1, 1), heads=2, depth=1))
    big = build_network(NetworkConfig(filters=8, blocks=(1, 2, 2, 2), heads=4, depth=2))
    n_small = sum(p.numel() for p in small.parameters())
    n_big = sum(p.numel() for p in big.parameters())
    assert big.stride == 8 and small.stride == 4
    assert n_big > 4 * n_small
    samu = build_network(NetworkConfig(filters=8, blocks=(1, 2, 2, 2), variant="samu"))
    assert sum(p.numel() for p in samu.parameters()) > n_big  # per-scale prompt attention adds weights


def test_dense_prompt_maps():
    pts = torch.tensor([[[2.0, 3.0, 4.0], [1.0, 1.0, 1.0], [5.0, 6.0, 7.0], [8.0, 8.0, 8.0]]])
    types = torch.tensor([[FG, BOX_MIN, BOX_MAX, BG]])
    d = dense_prompt_maps(pts, types, (10, 10, 10))
    assert d.shape == (1, 4, 10, 10, 10)
    assert d[0, 1, 1:6, 1:7, 1:8].min() == 1 and d[0, 1].sum() == 5 * 6 * 7
    assert d[0, 2, 2, 3, 4] == 1 and d[0, 2].argmax() == torch.tensor(2 * 100 + 3 * 10 + 4)
    assert d[0, 3, 8, 8, 8] == 1 and d[0, 0].sum() == 0
    with pytest.raises(ValueError):
        build_network(NetworkConfig(variant="nope"))


def test_rotary_stays_relative_under_bf16_autocast():
    """Under bf16 autocast (the CPU engine and bf16 training), the rotation is computed in float32: a click's
    sub-voxel offset survives and shifting both positions changes nothing beyond the bf16 rounding of q and k
    (computed in bf16, pos * freq was off by up to 0.125 rad at latent positions ~6 and the dot products moved by
    ~0.6 at positions ~60)."""
    torch.manual_seed(0)
    rot = Rotary3D(head_dim=32)
    q, k = torch.randn(1, 4, 1, 32).bfloat16(), torch.randn(1, 4, 1, 32).bfloat16()
    p1, p2 = torch.tensor([[[0.5, 0.5, 0.5]]]), torch.tensor([[[0.8, 0.3, 0.6]]])

    def dots(shift):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = rot(q, p1 + shift), rot(k, p2 + shift)
        assert a.dtype == torch.bfloat16
        return (a.float() * b.float()).sum(-1)

    ref = dots(0.0)
    for shift in (6.2, 60.2):
        assert (dots(shift) - ref).abs().max() < 0.1, shift
