"""Fast tests of the training pipeline (lib/training): optimiser split, learning, checkpoints, export, data."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lib.labels import LABEL_IDS, LABEL_NAMES, label_id
from lib.network import NetworkConfig, build_network
from lib.training import data as D
from lib.training.finetune import finetune
from lib.training.loop import Case, LoopConfig, concept_case, prompted_case, train_step
from lib.training.optim import build_optimizer, lr_factor, split_parameters
from lib.training.pretrain import export_weights, load_checkpoint, save_checkpoint

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "sample-datasets" / "train"
TINY = dict(filters=8, blocks=(1, 1, 1), depth=1, heads=2, num_labels=8, roi_size=(32, 32, 32))


def tiny_net(seed=0, **kw):
    torch.manual_seed(seed)
    return build_network(NetworkConfig(**{**TINY, **kw}))


def fixed_case(with_label=False, n=16):
    """A bright box in noise on an n^3 grid, with its box prompt (the network is fully convolutional)."""
    g = np.zeros((n, n, n), bool)
    a, b = n // 4, n // 4 + n // 2
    g[a:b, a + 1:b, a:b - 1] = True
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, n, n, n, generator=gen) * 0.1 + torch.as_tensor(g, dtype=torch.float32)[None, None] * 0.5
    box = np.array([[a - 1, a, a - 1], [b, b, b - 1]], np.float32)
    return Case(x, g, box, np.array([2, 3]), 3 if with_label else None)


def test_muon_gets_only_2d_views_and_updates_conv_weights():
    net = tiny_net()
    opt = build_optimizer(net, "muon", lr=1e-2)
    muon_params = [p for g in opt.muon.param_groups for p in g["params"]]
    assert muon_params and all(p.ndim == 2 for p in muon_params)
    adamw_ids = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    real_by_ptr = {}
    for real, view in opt.pairs:
        assert view.data_ptr() == real.data_ptr() and view.numel() == real.numel()
        assert id(real) not in adamw_ids
        real_by_ptr[view.data_ptr()] = real
    # stem (input) and output head go to AdamW, norms/biases/embeddings too
    names_muon = set(opt.muon_names)
    assert "encoder.stem.weight" not in names_muon and "decoder.bias.weight" not in names_muon
    assert not any("norm" in n or n.endswith(".bias") or "embed" in n for n in names_muon)
    conv = [(n, m.weight) for n, m in net.named_modules() if isinstance(m, nn.Conv3d) and f"{n}.weight" in names_muon]
    assert conv and all(w.ndim == 5 for _, w in conv)
    before = {n: w.detach().clone() for n, w in conv}
    loss, _ = train_step(net, opt, fixed_case(), np.random.default_rng(0), LoopConfig.on_grid((32, 32, 32)))
    changed = [n for n, w in conv if not torch.equal(before[n], w.detach())]
    assert len(changed) == len(conv), "every Muon-managed conv weight must change after a step"
    # all parameters are covered exactly once
    muon, adamw = split_parameters(net)
    assert len(muon) + len(adamw) == len(list(net.parameters()))


def test_adamw_option_has_no_muon():
    opt = build_optimizer(tiny_net(), "adamw")
    assert opt.muon is None and not opt.pairs
    with pytest.raises(ValueError):
        build_optimizer(tiny_net(), "sgd")


def test_lr_schedule_warmup_and_decay():
    assert lr_factor(0, 0.0, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(100, 0.0) == pytest.approx(1.0)
    assert lr_factor(100, 1.0, final=0.05) == pytest.approx(0.05)
    assert lr_factor(100, 0.3) > lr_factor(100, 0.6)


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_few_steps_reduce_loss_on_fixed_sample(kind):
    net = tiny_net()
    opt = build_optimizer(net, kind, lr=2e-3, muon_lr_scale=5.0)
    cfg = LoopConfig.on_grid((16, 16, 16), max_clicks=1)
    rng = np.random.default_rng(0)
    case = fixed_case()
    losses = []
    for i in range(20):
        opt.set_lr_factor(lr_factor(i, i / 20, warmup_steps=3))
        losses.append(train_step(net, opt, case, rng, cfg)[0])
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2])


def test_concept_case_trains_label_token():
    net = tiny_net()
    opt = build_optimizer(net, "muon")
    case = fixed_case(with_label=True)
    case.points, case.types = np.zeros((0, 3), np.float32), np.zeros(0, np.int64)
    emb = net.prompt_encoder.label_embed.weight[3].detach().clone()
    train_step(net, opt, case, np.random.default_rng(0), LoopConfig.on_grid((32, 32, 32)))
    assert not torch.equal(emb, net.prompt_encoder.label_embed.weight[3].detach())


def _weights(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_checkpoint_resume_restores_step_weights_and_continues_identically(tmp_path):
    cfg = LoopConfig.on_grid((16, 16, 16), max_clicks=1)
    case = fixed_case()
    net = tiny_net()
    opt = build_optimizer(net, "muon")
    rng = np.random.default_rng(5)
    for _ in range(2):
        train_step(net, opt, case, rng, cfg)
    save_checkpoint(tmp_path / "last.pt", net, opt, {"step": 2, "elapsed": 1.5}, rng)
    saved = _weights(net)
    for _ in range(2):
        train_step(net, opt, case, rng, cfg)
    cont = _weights(net)

    net2 = tiny_net(seed=99)
    opt2 = build_optimizer(net2, "muon")
    rng2 = np.random.default_rng(0)
    state = load_checkpoint(tmp_path / "last.pt", net2, opt2, rng2)
    assert state["step"] == 2 and state["elapsed"] == 1.5
    for k, v in _weights(net2).items():
        assert torch.equal(v, saved[k]), k
    for _ in range(2):
        train_step(net2, opt2, case, rng2, cfg)
    for k, v in _weights(net2).items():
        assert torch.allclose(v, cont[k], atol=1e-6), k


def test_export_loads_with_weights_only_and_fits_25mb(tmp_path):
    net = build_network(NetworkConfig())  # the shipped size
    path = tmp_path / "best.pt"
    export_weights(net, path, {"step": 0})
    assert path.stat().st_size <= 25 * 1024 * 1024
    art = torch.load(path, weights_only=True)  # one artefact: weights + meta (lib.weights)
    assert art["format"] == "ensam-weights/1" and art["meta"]["step"] == 0 and art["meta"]["vocabulary"]["liver"] == 4
    sd = art["state_dict"]
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    fresh = build_network(NetworkConfig())
    fresh.load_state_dict(sd)
    assert (tmp_path / "best_labels.json").exists()  # human-readable copy


def test_label_vocabulary_is_stable():
    assert len(LABEL_NAMES) <= NetworkConfig().num_labels
    assert LABEL_IDS["spleen"] == 0 and LABEL_IDS["liver"] == 4 and LABEL_IDS["brain"] == 89
    assert LABEL_IDS["costal_cartilages"] == 116 and LABEL_IDS["white_matter"] == 117
    assert label_id("Gray Matter") == LABEL_IDS["grey_matter"] and label_id("nonsense") is None


def _toy_volume():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 20, (48, 44, 40)).astype(np.float32) - 1000
    img[6:42, 6:38, 4:36] += 1040  # a "body"
    lab = np.zeros(img.shape, np.int16)
    lab[12:24, 12:22, 10:20] = 1
    img[lab == 1] += 80
    lab[28:36, 20:30, 18:30] = 5
    img[lab == 5] -= 60
    aff = np.diag([1.5, 1.5, 2.5, 1.0])
    return D.make_volume("toy", img, aff, lab, {1: "spleen", 5: "liver"}, "CT")


def _check_sample(s):
    assert s.image.shape == s.mask.shape and s.image.ndim == 3
    assert s.mask.dtype == bool and s.mask.any() and np.isfinite(s.image).all()
    assert len(s.spacing) == 3 and np.all(np.asarray(s.spacing) > 0)


def test_toy_sources_yield_aligned_nonempty_masks(tmp_path):
    vol = _toy_volume()
    D.precompute([vol], tmp_path, log=lambda m: None)
    sampler = D.ObjectSampler([vol], holdout=())
    assert set(sampler.sources) >= {"real", "slic", "watershed", "blob", "tube", "shell", "lesion"}
    rng = np.random.default_rng(1)
    for src in sampler.sources:
        if src == "window":
            continue  # needs real anatomy; exercised on the training volumes below
        s = sampler.sample(rng, source=src)
        _check_sample(s)
        case = prompted_case(s.image, s.mask, s.spacing, rng, LoopConfig())
        if case is not None:
            assert case.image.shape == (1, 1, 64, 64, 64) and case.gt.any()
            assert np.all(case.points >= -1) and np.all(case.points <= 64)
    w, vid = sampler.concept_window(rng)
    assert w.image.shape == (64, 64, 64) and w.mask.shape == (64, 64, 64) and vid in (0, 4)
    c = concept_case(w.image, w.mask, vid)
    assert c.image.shape == (1, 1, 64, 64, 64) and len(c.points) == 0


@pytest.mark.skipif(not (TRAIN / "dataset.json").exists(), reason="sample-datasets/train not fetched (make data)")
def test_training_volume_sources():
    vols = D.load_volumes(TRAIN)
    assert vols and all(v.labels is None or v.labels.shape == v.image.shape for v in vols)
    sampler = D.ObjectSampler(vols)  # no precompute: supervoxel sources are skipped
    names = {s[2] for s in sampler.structures}
    assert not names & set(D.DEFAULT_HOLDOUT)
    rng = np.random.default_rng(2)
    for src in ("real", "window", "blob", "tube", "lesion"):
        _check_sample(sampler.sample(rng, source=src))
    with pytest.raises(ValueError):
        D.load_volumes(ROOT / "sample-datasets" / "eval")


def test_finetune_runs_and_reports():
    vol = _toy_volume()
    net = tiny_net(num_labels=8)
    cases = [{"image": vol.image, "label": vol.labels, "affine": vol.affine}]
    stats = finetune(net, cases, max_seconds=60, max_steps=3, label_ids={1: 0, 5: 4},
                     loop=LoopConfig.on_grid((16, 16, 16), max_clicks=1))
    assert stats["steps"] == 3 and stats["samples_per_s"] > 0 and np.isfinite(stats["loss_last"])


def test_the_anchor_pulls_fine_tuned_weights_back_toward_the_start():
    """anchor a: after every step the weights move a fraction a back to where they started, so after the same
    steps (same seed, same draws) they lie nearer the start than without it; an anchor outside [0, 1) is refused."""
    vol = _toy_volume()
    cases = [{"image": vol.image, "label": vol.labels, "affine": vol.affine}]
    moved = {}
    for anchor in (0.0, 0.5):
        net = tiny_net(num_labels=8)
        start = [p.detach().clone() for p in net.parameters()]
        finetune(net, cases, max_seconds=60, max_steps=3, anchor=anchor, optimizer="adamw", lr=1e-2,
                 loop=LoopConfig.on_grid((16, 16, 16), max_clicks=1))
        moved[anchor] = sum(float((p.detach() - p0).norm()) for p, p0 in zip(net.parameters(), start))
    assert 0 < moved[0.5] < 0.8 * moved[0.0]
    with pytest.raises(ValueError, match="anchor"):
        finetune(tiny_net(num_labels=8), cases, max_seconds=60, max_steps=1, anchor=1.0,
                 loop=LoopConfig.on_grid((16, 16, 16), max_clicks=1))


@pytest.mark.skipif(not (TRAIN / "dataset.json").exists(), reason="sample-datasets/train not fetched (make data)")
def test_pretrain_cli_runs_resumes_and_exports(tmp_path):
    from lib.training.pretrain import main

    out = tmp_path / "run"
    net = '{"filters": 8, "blocks": [1, 1, 1], "depth": 1, "heads": 2, "roi_size": [32, 32, 32]}'
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"source_weights": {"real": 1, "blob": 1, "lesion": 1}, "val_per_structure": 1, '
                   '"val_synthetic": 1, "val_concept": 1, "loop": {"max_clicks": 1}, "val_click_large": 1, '
                   '"val_large_view": 4.0, "keep_validated": true}')
    main(["--out", str(out), "--minutes", "5", "--max-steps", "2", "--network", net, "--config", str(cfg),
          "--no-progress", "--val-minutes", "100"])
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["state"]["step"] == 2
    # keep_validated: every validation's weights stay, named by their step (here the start's)
    kept = torch.load(out / "validated" / "step0.pt", weights_only=True)
    assert kept["meta"]["step"] == 0 and set(kept["state_dict"]) == set(ck["model"])
    # the lone-click sessions on large structures are validated apart and counted in the score (stop 36)
    val = ck["state"]["val_history"][0]
    assert 0.0 <= val["val_large_click2_dsc"] <= 1.0
    assert "lone-click cases on large structures" in (out / "log.txt").read_text()
    main(["--out", str(out), "--resume", "--max-steps", "3", "--no-progress"])
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["state"]["step"] == 3 and len(ck["state"]["history"]) == 3
    assert (out / "curves.png").exists() and (out / "config.json").exists()
    sd = torch.load(out / "best.pt", weights_only=True)["state_dict"]
    assert "decoder.bias.weight" in sd
    # a refiner run: the first run's weights answer the first prompts (frozen), recorded in the exported meta
    ref = tmp_path / "refiner"
    main(["--out", str(ref), "--minutes", "5", "--max-steps", "1", "--network", net, "--config", str(cfg),
          "--no-progress", "--val-minutes", "100", "--init", str(out / "best.pt"), "--first-answers",
          str(out / "best.pt")])
    meta = torch.load(ref / "best.pt", weights_only=True)["meta"]
    assert meta["first_answers"] == str(out / "best.pt")
    assert torch.load(ref / "last.pt", weights_only=False)["state"]["step"] == 1


def test_refinement_cases_are_finer_windows_on_the_coarse_boundary():
    """p_refine: a box case becomes a window finer than the box's ROI, with the coarse-grid view of the object as
    the previous mask (what the engine's native-resolution stage gives the network)."""
    from lib.geometry import choose_roi
    from lib.training.loop import refine_case

    shape = (120, 120, 120)
    zz, yy, xx = np.mgrid[:120, :120, :120]
    mask = (zz - 60) ** 2 / 45 ** 2 + (yy - 60) ** 2 / 30 ** 2 + (xx - 60) ** 2 / 40 ** 2 <= 1
    image = mask.astype(np.float32) + np.random.default_rng(0).normal(0, 0.1, shape).astype(np.float32)
    cfg = LoopConfig.on_grid((16, 16, 16), p_refine=1.0)
    rng = np.random.default_rng(1)
    from lib.prompts.simulation import box_from_mask

    box = box_from_mask(mask, 0)
    coarse_roi = choose_roi(shape, np.ones(3), boxes=box[None], policy=cfg.policy())
    c = refine_case(image, mask, coarse_roi, box, rng, cfg)
    assert c is not None and c.prev is not None and c.prev.shape == c.gt.shape == (16, 16, 16)
    assert 0 < c.gt.mean() < 1 and c.prev.any()            # a window across the boundary
    assert (c.prev != c.gt).any()                            # the coarse mask is not the answer
    assert list(c.types) == [2, 3]                           # the box stays the prompt
    # box corners: in a window ~2-4x finer than the ROI, the box spans beyond the window
    assert np.any(c.points[0] < 0) or np.any(c.points[1] > 15)
    # prompted_case hands out such cases at p_refine; train_step learns from them (prev mask at step 0)
    case = prompted_case(image, mask, np.ones(3), np.random.default_rng(2), cfg, use_box=True)
    assert case.kind == "refine" and case.prev is not None
    net = tiny_net(roi_size=(16, 16, 16))
    opt = build_optimizer(net, "adamw", lr=1e-3)
    loss, dices = train_step(net, opt, case, np.random.default_rng(0), cfg)
    assert np.isfinite(loss) and len(dices) >= 1


def test_select_volumes_keeps_the_named_training_volumes_only():
    from lib.training.pretrain import select_volumes

    vols = [D.Volume(name=n, image=np.zeros((2, 2, 2), np.float32), affine=np.eye(4)) for n in ("a", "b", "c")]
    assert [v.name for v in select_volumes(vols, [])] == ["a", "b", "c"]
    assert [v.name for v in select_volumes(vols, ["c", "a"])] == ["a", "c"]
    with pytest.raises(ValueError, match="not in the data"):
        select_volumes(vols, ["a", "zz"])


def test_a_paused_step_is_not_charged_to_the_budget():
    """charged_seconds: a step's wall time counts against the minutes budget, but a pause (SIGSTOP for a quiet
    benchmark) counts at most 10x the recent median, so the schedule does not jump ahead."""
    from collections import deque

    from lib.training.pretrain import charged_seconds

    recent = deque([2.0, 2.1, 1.9, 2.0], maxlen=50)
    assert charged_seconds(600.0, recent) == 120.0  # little history (just resumed): at most 2 minutes
    assert charged_seconds(30.0, recent) == 30.0
    recent.append(2.2)
    assert charged_seconds(2.5, recent) == 2.5
    assert charged_seconds(600.0, recent) == 20.0  # a 10-minute pause costs 10 median steps


def test_object_relative_lone_click_views():
    """LoopConfig.click_view_object (recipe v8): a lone click's view is the object's extent x log-U(lo, hi), so a
    large organ and a small nodule fill a similar share of the model grid; the contract's fixed view (64 mm) shows
    a 30 mm object whole and cuts a 150 mm one."""
    from lib.training.loop import object_relative_view

    spacing = np.array([2.0, 2.0, 2.0])
    shape = (120, 120, 120)
    grid = np.indices(shape)
    shares = {}
    for name, radius_mm in (("organ", 75.0), ("nodule", 15.0)):
        mask = (((grid - 60) * 2.0) ** 2).sum(0) <= radius_mm ** 2
        image = (mask * 100.0 + np.random.default_rng(0).normal(0, 5, shape)).astype(np.float32)
        views = [object_relative_view(mask, spacing, (1.5, 3.0), np.random.default_rng(s), 32.0) for s in range(50)]
        assert all(1.5 * 2 * radius_mm - 2 <= v <= 3.0 * 2 * radius_mm + 2 for v in views)
        assert np.std(np.log(views)) > 0.1  # drawn, not fixed
        for cfg in (LoopConfig(p_no_box=1.0), LoopConfig(p_no_box=1.0, click_view_object=(1.5, 3.0))):
            case = prompted_case(image, mask, spacing, np.random.default_rng(3), cfg, use_box=False, roi_jitter=False)
            shares[name, bool(cfg.click_view_object)] = case.gt.mean()
    # object-relative: both objects fill between ~2 % and 16 % of the grid (a ball of diameter 1/3..2/3 of the edge)
    assert 0.015 <= shares["organ", True] <= 0.16 and 0.015 <= shares["nodule", True] <= 0.16
    # fixed view: the organ fills the whole 64 mm view, the nodule a small part of it
    assert shares["organ", False] > 0.95 and shares["nodule", False] < 0.1


def test_part_of_lone_clicks_keep_the_contract_view():
    """LoopConfig.p_click_view_object (recipe v9): only that share of lone-click samples takes the object-relative
    view; the others keep the contract's fixed view, the one the engine opens around a lone click."""
    spacing = np.array([2.0, 2.0, 2.0])
    shape = (120, 120, 120)
    mask = (((np.indices(shape) - 60) * 2.0) ** 2).sum(0) <= 75.0 ** 2  # a 150 mm organ: the 64 mm view is all inside
    image = (mask * 100.0 + np.random.default_rng(0).normal(0, 5, shape)).astype(np.float32)

    def fixed_view_share(p):
        cfg = LoopConfig(p_no_box=1.0, click_view_object=(1.5, 3.0), p_click_view_object=p)
        cases = [prompted_case(image, mask, spacing, np.random.default_rng(s), cfg, use_box=False, roi_jitter=False)
                 for s in range(40)]
        # the contract's 64 mm view: the click is inside the organ, so it fills at least ~40 % of the view;
        # the object-relative view (1.5..3 x its 150 mm extent) shows it at <= 16 %
        return np.mean([c.gt.mean() > 0.3 for c in cases])

    assert fixed_view_share(1.0) == 0.0
    assert fixed_view_share(0.0) == 1.0
    assert 0.25 <= fixed_view_share(0.5) <= 0.75


def test_a_refiner_learns_its_corrections_from_the_main_networks_first_answers():
    """train_step(first_net=main): step 0 is the frozen main network's answer (its DSC first in the list), the
    trained network makes >= 1 corrective step from it, the main network is not changed; evaluate pairs them the
    same way (step 0 = main, so the box DSC is the main network's whatever the refiner)."""
    from lib.evaluation.metrics import dice
    from lib.training.loop import _first_answer, evaluate

    cfg = LoopConfig.on_grid((16, 16, 16), max_clicks=2)
    main, refiner = tiny_net(1), tiny_net(2)
    frozen = {k: v.clone() for k, v in main.state_dict().items()}
    case = fixed_case()
    expect = dice(_first_answer(main, case, "cpu", cfg), case.gt)
    assert expect < 1.0  # an untrained network leaves an error to correct
    opt = build_optimizer(refiner, "adamw", lr=1e-3)
    before = {k: v.clone() for k, v in refiner.state_dict().items()}
    for seed in range(3):
        loss, dices = train_step(refiner, opt, case, np.random.default_rng(seed), cfg, first_net=main)
        assert np.isfinite(loss) and dices[0] == pytest.approx(expect) and len(dices) >= 2
    assert all(torch.equal(frozen[k], v) for k, v in main.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in refiner.state_dict().items())
    paired = evaluate(refiner, [case], n_clicks=1, cfg=cfg, first_net=main)
    alone = evaluate(refiner, [case], n_clicks=1, cfg=cfg)
    assert paired["val_box_dsc"] == pytest.approx(expect)
    assert alone["val_box_dsc"] != pytest.approx(expect)


def test_the_change_penalty_covers_only_right_voxels_far_from_the_new_prompt():
    """kept_region: voxels the previous answer got right and farther than change_reach x the object's radius
    (at least change_reach_min) from every point of the new prompt; the loss with change_weight is the plain loss
    plus a term that is 0 when the step keeps the previous answer there and grows with what it changes there."""
    from lib.training.loop import _loss, kept_region

    cfg = LoopConfig.on_grid((16, 16, 16), change_weight=1.0, change_reach=1.0, change_reach_min=3.0)
    gt = np.zeros((16, 16, 16), bool)
    gt[4:12, 4:12, 4:12] = True                       # 512 voxels: radius ~4.96
    prev = gt.copy()
    prev[10:12] = False                               # the previous answer missed two slabs
    click = np.array([[11.0, 8.0, 8.0]], np.float32)
    kept = kept_region(prev, gt, click, cfg)
    assert not (kept & (prev != gt)).any()            # wrong there: free to change
    near = np.linalg.norm(np.indices(gt.shape).reshape(3, -1).T - click, axis=1).reshape(gt.shape) <= 4.96
    assert not (kept & near).any()                    # near the click: free to change
    assert kept[4, 4, 4] and kept[0, 0, 0] and kept.sum() > 0.8 * gt.size

    target = torch.as_tensor(gt, dtype=torch.float32)[None, None]
    p_prev = torch.as_tensor(prev, dtype=torch.float32)[None, None]
    keep = (torch.as_tensor(kept)[None, None], p_prev)
    same = (p_prev * 2 - 1) * 20                      # logits that repeat the previous answer
    plain = _loss(same, target, cfg)
    assert _loss(same, target, cfg, keep=keep).item() == pytest.approx(plain.item(), abs=1e-4)
    flipped = same.clone()
    flipped[..., 4:8, :, :] *= -1                     # drop the far half of the object and fill its background
    off = LoopConfig.on_grid((16, 16, 16))
    assert _loss(flipped, target, cfg, keep=keep).item() > _loss(flipped, target, off, keep=keep).item() + 0.5


def test_the_change_penalty_can_be_kept_to_sessions_that_started_from_a_box():
    """change_boxed_only: a corrective step of a lone-click session pays no change penalty (its first answer is a
    small part of the object: the needed change is far from the click); a box session's step still does."""
    from lib.network import BOX_MAX, BOX_MIN, FG
    from lib.training.loop import _keep

    gt = np.zeros((16, 16, 16), bool)
    gt[4:12, 4:12, 4:12] = True
    prev = gt.copy()
    prev[10:12] = False
    correction = (np.array([[11.0, 8.0, 8.0]], np.float32), True)
    p_prev = torch.as_tensor(prev, dtype=torch.float32)[None, None]
    boxed, lone = np.array([BOX_MIN, BOX_MAX]), np.array([FG])
    only = LoopConfig.on_grid((16, 16, 16), change_weight=1.0, change_boxed_only=True)
    everywhere = LoopConfig.on_grid((16, 16, 16), change_weight=1.0)
    assert _keep(prev, gt, correction, p_prev, only, lone) is None
    kept, _ = _keep(prev, gt, correction, p_prev, only, boxed)
    assert kept.sum() > 0
    assert _keep(prev, gt, correction, p_prev, everywhere, lone) is not None
    assert _keep(prev, gt, correction, p_prev, LoopConfig.on_grid((16, 16, 16)), boxed) is None


def test_training_with_the_change_penalty_runs_and_validation_counts_harmful_steps():
    from lib.training.loop import evaluate

    cfg = LoopConfig.on_grid((16, 16, 16), max_clicks=2, change_weight=1.0)
    main, refiner = tiny_net(1), tiny_net(2)
    opt = build_optimizer(refiner, "adamw", lr=1e-3)
    case = fixed_case()
    for seed in range(2):
        loss, dices = train_step(refiner, opt, case, np.random.default_rng(seed), cfg, first_net=main)
        assert np.isfinite(loss) and len(dices) >= 2
    scores = evaluate(refiner, [case], n_clicks=2, cfg=cfg, first_net=main)
    assert 0.0 <= scores["val_harmful"] <= 1.0
