"""Issue 14: the xLSTM image encoder option (lib/network/xlstm.py, NetworkConfig(encoder="xlstm")): the SegResNet
encoder's output shapes, a prompt-free (cacheable) encoding, a bidirectional pass along the slice axis, the chunked
mLSTM equal to the step-by-step recurrence, and save/load through lib.weights and the engine."""

import json
import os

import numpy as np
import pytest
import torch

from lib.contract import Contract
from lib.engine import EnsamEngine, load_network
from lib.geometry import RoiPolicy
from lib.network import BG, BOX_MAX, BOX_MIN, FG, NetworkConfig, build_network, dense_prompt_maps
from lib.network.xlstm import MLSTM, XLSTMBlock, mlstm_chunked, mlstm_recurrent
from lib.weights import load_artefact, read_meta, save_artefact

torch.set_num_threads(1)
SMALL = dict(filters=4, blocks=(1, 1, 1), heads=2, depth=1, num_labels=8)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_JSON = os.path.join(ROOT, "apps", "ensam", "model", "pretrained_ensam.json")


def _net(encoder, seed=0, **kw):
    torch.manual_seed(seed)
    return build_network(NetworkConfig(**SMALL, encoder=encoder, **kw)).eval()


def _prompts(shape):
    pts = torch.tensor([[[5.0, 6.0, 7.0], [1.0, 1.0, 1.0], [10.0, 12.0, 8.0], [3.0, 3.0, 3.0]]])
    types = torch.tensor([[FG, BOX_MIN, BOX_MAX, BG]])
    return pts, types, dense_prompt_maps(pts, types, shape)


@pytest.mark.parametrize("shape", [(17, 23, 9), (16, 16, 16), (33, 20, 12), (5, 7, 3)])
def test_output_shapes_equal_the_segresnet_encoders(shape):
    ref, net = _net("segresnet"), _net("xlstm", xlstm_head_dim=2, xlstm_chunk=7)
    x = torch.randn(1, 1, *shape)
    pts, types, dense = _prompts(shape)
    with torch.no_grad():
        want, got = ref.encode(x), net.encode(x)
        y = net(x, pts, types, dense)
    assert [f.shape for f in got] == [f.shape for f in want]
    assert net.encoder.channels == ref.encoder.channels and net.stride == ref.stride
    assert y.shape == (1, 1, *shape) and torch.isfinite(y).all()
    assert all(torch.isfinite(f).all() for f in got)


def test_default_config_and_old_configs_build_the_segresnet_encoder_unchanged():
    """Old weights/configs (releases 1-3) have no ``encoder`` key: they build exactly the network they built before;
    the shipped weights' config names the SegResNet encoder."""
    shipped = json.load(open(SHIPPED_JSON))["network"]
    assert shipped.get("encoder", "segresnet") == "segresnet"
    old = {k: v for k, v in shipped.items() if k not in ("encoder", "xlstm_head_dim", "xlstm_chunk")}
    cfg = NetworkConfig.from_dict(old)
    assert cfg.encoder == "segresnet" and NetworkConfig().encoder == "segresnet"
    torch.manual_seed(0)
    net = build_network(cfg)
    assert type(net.encoder).__name__ == "ImageEncoder"
    assert not any("mlstm" in k for k in net.state_dict())
    with pytest.raises(ValueError, match="encoder must be"):
        build_network(NetworkConfig(**SMALL, encoder="vit"))


def test_encoding_does_not_depend_on_prompts():
    net = _net("xlstm")
    x = torch.randn(1, 1, 16, 16, 16)
    pts, types, dense = _prompts((16, 16, 16))
    one = (pts[:, :1], types[:, :1], dense_prompt_maps(pts[:, :1], types[:, :1], (16, 16, 16)))
    with torch.no_grad():
        f1 = net.encode(x)
        a = net.decode(f1, pts, types, dense)
        f2 = net.encode(x)
        b = net.decode(f2, *one)
        whole = net(x, *one)
    assert all(torch.equal(u, v) for u, v in zip(f1, f2))  # the cache may reuse the encoding across clicks
    assert torch.allclose(whole, b)  # and decoding a cached encoding equals the full forward pass
    assert not torch.allclose(a, b)  # the prompts do change the output


def _first_last_slice_influence(block, slice_axis):
    """(change at the first slice after editing the last, change at the last slice after editing the first)."""
    x = torch.randn(1, 8, 5, 6, 7)
    idx = [slice(None)] * 5

    def at(i):
        s = list(idx)
        s[2 + slice_axis % 3] = i
        return tuple(s)

    with torch.no_grad():
        y = block(x)
        x_last, x_first = x.clone(), x.clone()
        x_last[at(-1)] += torch.randn_like(x_last[at(-1)])
        x_first[at(0)] += torch.randn_like(x_first[at(0)])
        first = (block(x_last) - y)[at(0)].abs().max().item()
        last = (block(x_first) - y)[at(-1)].abs().max().item()
    return first, last


@pytest.mark.parametrize("slice_axis", [-1, 0])
def test_bidirectional_pass_sees_both_directions_along_the_slice_axis(slice_axis):
    torch.manual_seed(0)
    both = XLSTMBlock(8, heads=2, chunk=4, slice_axis=slice_axis).eval()
    first, last = _first_last_slice_influence(both, slice_axis)
    assert first > 1e-4 and last > 1e-4  # the last slice reaches the first and the first the last
    # a forward-only block (same weights) is causal along the slice axis: the last slice never reaches the first
    fwd = XLSTMBlock(8, heads=2, chunk=4, slice_axis=slice_axis, bidirectional=False).eval()
    fwd.load_state_dict(both.state_dict())
    first, last = _first_last_slice_influence(fwd, slice_axis)
    assert first == 0.0 and last > 1e-4


@pytest.mark.parametrize("length,chunk", [(1, 4), (13, 4), (20, 4), (32, 8), (37, 64), (50, 7), (100, 3)])
def test_chunked_mlstm_equals_the_recurrent_reference(length, chunk):
    g = torch.Generator().manual_seed(length * 100 + chunk)
    b, h, dk, dv = 2, 3, 5, 4
    q, k = torch.randn(b, h, length, dk, generator=g), torch.randn(b, h, length, dk, generator=g)
    v = torch.randn(b, h, length, dv, generator=g)
    # gates over a wide range: input gates up to exp(8), forget gates from ~0 (resets) to ~1
    ig, fg = 4 * torch.randn(b, h, length, generator=g), 4 * torch.randn(b, h, length, generator=g)
    want = mlstm_recurrent(q, k, v, ig, fg)
    got = mlstm_chunked(q, k, v, ig, fg, chunk)
    assert got.shape == (b, h, length, dv)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_chunked_mlstm_gradients_equal_the_recurrent_reference():
    layer = MLSTM(12, heads=3, chunk=5)
    x = torch.randn(2, 23, 12, requires_grad=True)
    grads = []
    for recurrent in (False, True):
        x.grad = None
        layer.zero_grad()
        layer(x, recurrent=recurrent).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_chunked_mlstm_is_stable_with_extreme_gates():
    """Input gates of exp(+-50) and forget gates at 0 or 1: the stabiliser keeps every value finite and equal to
    the reference."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 4, generator=g) for _ in range(3))
    ig = 50 * torch.sign(torch.randn(1, 2, 40, generator=g))
    fg = 30 * torch.sign(torch.randn(1, 2, 40, generator=g))
    got = mlstm_chunked(q, k, v, ig, fg, 8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, mlstm_recurrent(q, k, v, ig, fg), rtol=1e-4, atol=1e-4)


def test_save_and_load_through_the_weights_path(tmp_path):
    net = _net("xlstm", xlstm_head_dim=2, roi_size=(16, 16, 16))
    contract = Contract(roi=RoiPolicy(model_shape=(16, 16, 16)))
    path = str(tmp_path / "xlstm.pt")
    save_artefact(path, net.state_dict(), {"network": net.config.to_dict(), "contract": contract.to_dict()},
                  vocabulary={"liver": 4})
    art = load_artefact(path)
    assert art.network["encoder"] == "xlstm" and read_meta(path)["network"]["xlstm_head_dim"] == 2
    built = load_network(path)
    assert isinstance(built.encoder, type(net.encoder))
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), net.state_dict().values()))
    eng = EnsamEngine(weights=path)  # the engine builds the xLSTM network from the stored config
    assert eng.network.config == net.config
    rng = np.random.default_rng(0)
    img = rng.normal(0, 20, (30, 28, 12)).astype(np.int16)
    img[10:20, 8:20, 3:9] += 300
    mask = eng.segment(img, np.diag([1.0, 1.0, 2.5, 1.0]), boxes=[[10, 19, 8, 19, 3, 8]])
    assert mask.shape == img.shape and mask.dtype == np.uint8 and mask.sum() > 0
