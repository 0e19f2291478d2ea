"""The multi-mask head (issue 27, "one click, one structure"): several answers to a lone click and a predicted DSC
for each (lib/network/mask_head.py), its training step (lib/training/mask_head.py), the engine's choice and the
artefact that carries it beside a refiner."""

import numpy as np
import torch

from lib.contract import contract_for_network
from lib.engine import EngineConfig, EnsamEngine
from lib.network import FG, NetworkConfig, add_mask_head, build_network, dense_prompt_maps
from lib.training.loop import Case
from lib.training.mask_head import fit_quality, head_loss, masks_and_quality, validate, _frozen_trunk
from lib.weights import load_artefact, save_artefact
from test_engine import volume  # noqa: F401 - a bright block in noise, a fixture

torch.set_num_threads(1)
CFG = NetworkConfig(filters=4, blocks=(1, 1, 1), heads=2, depth=1, roi_size=(24, 24, 24), num_labels=8)


def _nets():
    torch.manual_seed(0)
    base = build_network(CFG).eval()
    return base, add_mask_head(base, 3).eval()


def _prompt(shape=(24, 24, 24)):
    p = torch.tensor([[[12.0, 11.0, 13.0]]])
    t = torch.tensor([[FG]])
    return p, t, dense_prompt_maps(p, t, shape)


def test_mask_zero_is_the_network_unchanged_and_the_warm_start_shifts_the_others():
    base, net = _nets()
    x = torch.randn(1, 1, 24, 24, 24)
    p, t, dense = _prompt()
    with torch.no_grad():
        ref = base.decode(base.encode(x), p, t, dense)
        feats = net.encode(x)
        logits, quality = net.decode_masks(feats, p, t, dense)
        single = net.decode(feats, p, t, dense)
    assert logits.shape == (1, 3, 24, 24, 24) and quality.shape == (1, 3)
    assert torch.allclose(logits[:, :1], ref, atol=1e-5) and torch.allclose(single, ref, atol=1e-5)
    # the extra masks start as mask 0's readout moved by -1.5 and +1.5: one smaller, one larger answer
    assert torch.allclose(logits[:, 1] - logits[:, 0], torch.full_like(logits[:, 0], -1.5), atol=1e-4)
    assert torch.allclose(logits[:, 2] - logits[:, 0], torch.full_like(logits[:, 0], 1.5), atol=1e-4)
    assert (logits[:, 1] > 0).sum() <= (logits[:, 0] > 0).sum() <= (logits[:, 2] > 0).sum()


def test_the_loss_trains_only_the_best_mask():
    _, net = _nets()
    for name, prm in net.named_parameters():
        prm.requires_grad_(name.startswith("mask_head."))
    with torch.no_grad():  # mask 2 a confident answer (10x its logits): its soft loss on its own mask is the lowest
        net.mask_head.hyper[1][2].weight.mul_(10)
        net.mask_head.hyper[1][2].bias.mul_(10)
        net.mask_head.bias.weight[1].mul_(10)
        net.mask_head.bias.bias[1].mul_(10)
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(1, 1, 24, 24, 24, generator=gen)
    trunk = _frozen_trunk(net, Case(image, np.zeros((24,) * 3, bool), np.array([[12.0, 11.0, 13.0]], np.float32),
                                    np.array([FG])), sigma=2.0)
    logits, quality = masks_and_quality(net, trunk)
    # a target that the larger mask (2) fits best: everything mask 2 says
    gt = (logits.detach()[0, 2] > 0).numpy()
    assert gt.any()
    loss, dsc = head_loss(logits, gt)
    assert dsc[2] == 1.0 and dsc.argmax() == 2
    from lib.training.mask_head import _per_mask_loss
    assert int(torch.argmin(_per_mask_loss(logits.detach(), torch.as_tensor(gt, dtype=torch.float32)))) == 2
    loss.backward()
    h = net.mask_head
    # mask 2's readout (extra mask index 1) moves; mask 1's does not
    assert h.hyper[1][0].weight.grad.abs().sum() > 0
    assert h.hyper[0][0].weight.grad is None or h.hyper[0][0].weight.grad.abs().sum() == 0
    assert all(p.grad is None for n, p in net.named_parameters() if not n.startswith("mask_head."))


def _prefer_large(net):
    """A quality head that scores a mask by its size alone (so the largest mask is chosen)."""
    q = net.mask_head.quality
    with torch.no_grad():
        for m in (q[0], q[2]):
            m.weight.zero_()
            m.bias.zero_()
        q[0].weight[0, q[0].in_features - 3] = 1.0  # hidden unit 0 <- log soft size (+ 12: GELU's linear part)
        q[0].bias[0] = 12.0
        q[2].weight[0, 0] = 0.1  # predicted DSC logits about 0 .. 1.2: no saturation


def test_the_engine_answers_a_lone_click_with_the_best_scored_mask_and_a_box_with_mask_zero(volume):
    img, aff = volume
    base, net = _nets()
    _prefer_large(net)
    cfg = EngineConfig(max_zoom=0, boundary_cut=None)
    eng = EnsamEngine(network=net, config=cfg)
    plain = EnsamEngine(network=base, config=cfg)
    click = dict(points=[[30, 32, 15]], point_labels=[1])
    chosen = eng.segment(img, aff, **click)
    info = eng.last_info
    assert info["mask"]["index"] == 2 and len(info["mask"]["qualities"]) == 3
    assert info["mask"]["quality"] == max(info["mask"]["qualities"])
    assert chosen.sum() >= plain.segment(img, aff, **click).sum()
    off = EnsamEngine(network=net, config=EngineConfig(max_zoom=0, boundary_cut=None, multimask=False))
    assert np.array_equal(off.segment(img, aff, **click), plain.segment(img, aff, **click))
    assert "mask" not in off.last_info
    box = [[20, 39, 20, 44, 10, 19]]
    assert np.array_equal(eng.segment(img, aff, boxes=box), plain.segment(img, aff, boxes=box))
    assert "mask" not in eng.last_info
    # a corrective click (a previous mask) is answered by mask 0 too
    prev = plain.segment(img, aff, boxes=box)
    fix = dict(points=[[30, 32, 15]], point_labels=[0], prev_mask=prev)
    assert np.array_equal(eng.segment(img, aff, **fix), plain.segment(img, aff, **fix))


def test_an_artefact_with_a_head_carries_a_refiner_without_one(tmp_path, volume):
    img, aff = volume
    base, net = _nets()
    meta = {"network": net.config.to_dict(), "contract": contract_for_network(net.config).to_dict()}
    torch.manual_seed(5)
    refiner = build_network(CFG).state_dict()
    path = save_artefact(str(tmp_path / "w.pt"), net.state_dict(), meta, refiner=refiner)
    art = load_artefact(path)
    assert any(k.startswith("mask_head.") for k in art.state_dict)
    assert not any(k.startswith("mask_head.") for k in art.refiner)
    eng = EnsamEngine(weights=path, config=EngineConfig(max_zoom=0, boundary_cut=None))
    assert eng.network.mask_head is not None and eng.refiner.mask_head is None
    first = eng.segment(img, aff, points=[[30, 32, 15]], point_labels=[1])
    assert eng.last_info["weights"] == "main" and "mask" in eng.last_info
    eng.segment(img, aff, points=[[30, 32, 15], [25, 25, 12]], point_labels=[1, 0], prev_mask=first)
    assert eng.last_info["weights"] == "refiner"


def test_validation_reports_mask_zero_the_oracle_and_the_choice():
    _, net = _nets()
    _prefer_large(net)
    rng = np.random.default_rng(0)
    cases = []
    for i in range(3):
        image = torch.as_tensor(rng.normal(size=(1, 1, 24, 24, 24)), dtype=torch.float32)
        gt = np.zeros((24,) * 3, bool)
        gt[8:16, 8:16, 8:16] = True
        cases.append(Case(image, gt, np.array([[12.0, 12.0, 12.0]], np.float32), np.array([FG])))
    v = validate(net, cases, sigma=2.0)
    assert v["n"] == 3 and sum(v["picks"]) == 3 and v["picks"][2] == 3
    assert v["oracle"] >= max(v["mask0"], v["chosen"]) - 1e-9


def test_the_quality_fit_learns_which_mask_is_best_from_the_masks_own_features():
    """Samples whose best mask is told by one of the mask's own statistics (its soft size, scaled: the fit must
    standardise; the best size in the middle of the range: not monotonic, the hidden layer is needed) and not by the
    prompt tokens: after the fit the head picks the best mask of new samples."""
    _, net = _nets()
    head = net.mask_head
    rng = np.random.default_rng(0)
    d = head.quality[0].in_features

    def draw(n):
        feats = rng.normal(size=(n, 3, d)).astype(np.float32)
        feats[:, :, : d - 19] = rng.normal(size=(n, 1, d - 19)) * 5  # tokens: shared by the masks of a sample
        size = rng.uniform(-6, 0, size=(n, 3))
        feats[:, :, -3] = size * 100.0
        dsc = np.clip(1 - np.abs(size + 3) / 3, 0, 1).astype(np.float32)  # best: sizes near -3
        return feats, dsc

    feats, dsc = draw(400)
    fit_quality(head, feats, dsc, epochs=300)
    test_f, test_d = draw(200)
    with torch.no_grad():
        q = head.quality(torch.as_tensor(test_f))[..., 0].numpy()
    picked = test_d[np.arange(200), q.argmax(1)]
    assert picked.mean() > test_d.mean(1).mean() + 0.1  # far better than a random mask
    assert picked.mean() > 0.9 * test_d.max(1).mean()
