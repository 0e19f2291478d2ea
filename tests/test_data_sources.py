"""The training data package (lib/training/data/) on two small synthetic volumes (no ``make data`` needed): the
source registry, and the samples themselves, which must stay those drawn before the package was split out of one
module (``GOLDEN`` below was recorded with the old ``lib/training/data.py`` at the same seeds)."""

import hashlib

import numpy as np
import pytest
import torch

from lib.contract import Contract
from lib.training import data as D

torch.set_num_threads(1)


def _ellipsoid(shape, centre, radii):
    g = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum(((x - c) / r) ** 2 for x, c, r in zip(g, centre, radii)) <= 1.0


def ct_volume():
    """An abdomen-like CT: air, a body, five labelled organs (one of them a default holdout structure)."""
    rng = np.random.default_rng(11)
    shape = (96, 80, 44)
    img = np.full(shape, -1000.0, np.float32)
    img[_ellipsoid(shape, (48, 40, 22), (44, 36, 40))] = 0.0
    lab = np.zeros(shape, np.uint8)
    organs = {1: ("liver", (30, 34, 22), (14, 12, 9), 60.0), 2: ("spleen", (66, 28, 24), (7, 8, 6), 45.0),
              3: ("kidney_left", (66, 52, 20), (6, 6, 5), 30.0), 4: ("aorta", (48, 50, 22), (3, 3, 18), 200.0),
              5: ("vertebrae_L2", (48, 62, 22), (8, 6, 4), 400.0)}
    for k, (_, c, r, hu) in organs.items():
        m = _ellipsoid(shape, c, r)
        img[m], lab[m] = hu, k
    img += rng.normal(0.0, 15.0, shape).astype(np.float32)
    affine = np.diag([-1.5, 1.2, 2.5, 1.0])
    affine[:3, 3] = (40.0, -30.0, 5.0)
    names = {k: v[0] for k, v in organs.items()}
    return D.make_volume("synthetic_ct", img, affine, lab, names, "CT", rng=np.random.default_rng(1))


def mr_volume():
    """A head-like T1 MR: white matter, grey matter and the rest of the brain (so a 'brain' union is added)."""
    rng = np.random.default_rng(12)
    shape = (72, 80, 64)
    img = np.zeros(shape, np.float32)
    lab = np.zeros(shape, np.uint8)
    head = _ellipsoid(shape, (36, 40, 32), (30, 34, 28))
    img[head] = 300.0
    for k, r, val in ((3, (22, 26, 20), 200.0), (2, (17, 20, 15), 550.0), (1, (10, 13, 8), 800.0)):
        m = _ellipsoid(shape, (36, 40, 32), r)
        img[m], lab[m] = val, k
    img += rng.normal(0.0, 20.0, shape).astype(np.float32)
    names = {1: "white_matter", 2: "grey_matter", 3: "brain_other"}
    return D.make_volume("synthetic_mr", img, np.eye(4), lab, names, "", rng=np.random.default_rng(2))


def signature(s) -> list:
    """kind, name, label id, shape, spacing, mask hash, mask voxels, then the image's sum and sum of squares (the
    only floats: compared with a tolerance)."""
    img = np.asarray(s.image, np.float64)
    return [s.kind, s.name, int(s.label_id), list(s.image.shape), [round(float(x), 4) for x in s.spacing],
            hashlib.sha1(np.ascontiguousarray(s.mask, bool).tobytes()).hexdigest()[:12], int(s.mask.sum()),
            [float(f"{img.sum():.9g}"), float(f"{(img ** 2).sum():.9g}")]]


SOURCE_ORDER = ("real", "synth", "slic", "watershed", "window", "blob", "tube", "shell", "lesion")


def draw_all(cache_dir) -> dict:
    """Every recorded draw, in one fixed order from fixed seeds."""
    vols = [ct_volume(), mr_volume()]
    D.precompute(vols, cache_dir, log=lambda m: None)
    sampler = D.ObjectSampler(vols, weights={**D.SOURCE_WEIGHTS, "synth": 0.1})
    out = {"sources": sampler.sources, "p": [round(float(p), 9) for p in sampler.p],
           "structures": [list(st) for st in sampler.structures]}
    for i, src in enumerate(SOURCE_ORDER):
        rng = np.random.default_rng(100 + i)
        out[src] = [signature(sampler.sample(rng, source=src)) for _ in range(2)]
        out[src + ":raw"] = signature(sampler.sample(rng, source=src, aug=False))
        out[src + ":next"] = int(rng.integers(2 ** 62))
    rng = np.random.default_rng(7)
    out["mixed"] = [signature(sampler.sample(rng)) for _ in range(6)]
    out["mixed:next"] = int(rng.integers(2 ** 62))
    rng = np.random.default_rng(8)
    out["concept"] = [signature(sampler.concept_window(rng)[0]), signature(sampler.concept_window(
        rng, aug=False, p_centred=0.0, window=32, spacing_mm=4.0)[0])]
    out["concept:next"] = int(rng.integers(2 ** 62))
    held = D.ObjectSampler(vols, only_holdout=True)
    out["held"] = [list(st) for st in held.structures]
    damped = D.ObjectSampler(vols, volume_weights={"synthetic_mr": 0.25})
    out["damped_p_volume"] = [round(float(p), 9) for p in damped._p_volume]
    rng = np.random.default_rng(9)
    out["damped"] = [signature(damped.sample(rng, source="real", aug=False)) for _ in range(4)]
    return out


def case_signature(c) -> list:
    """A model-grid training / validation case (lib.training.loop.Case) in the same form as :func:`signature`."""
    img = c.image.double()
    return [c.kind, c.name, -1 if c.label_id is None else int(c.label_id), int(c.seed),
            np.round(np.asarray(c.points, np.float64), 3).tolist(), np.asarray(c.types).tolist(),
            hashlib.sha1(np.ascontiguousarray(c.gt, bool).tobytes()).hexdigest()[:12], int(c.gt.sum()),
            [float(f"{img.sum():.9g}"), float(f"{(img ** 2).sum():.9g}")]]


def pretrain_cases() -> dict:
    """Pre-training's validation cases and training cases on the two volumes (lib.training.pretrain)."""
    from lib.training.pretrain import PretrainConfig, build_validation, draw_case

    vols = [ct_volume(), mr_volume()]
    cfg = PretrainConfig(val_per_structure=1, val_click_start=1, val_synthetic=3, val_concept=1)
    lcfg = cfg.loop_config()
    out = {"validation": [case_signature(c) for c in build_validation(vols, cfg, lcfg)]}
    sampler = D.ObjectSampler(vols, holdout=cfg.holdout, weights=cfg.source_weights)
    rng = np.random.default_rng(5)
    out["training"] = [case_signature(draw_case(sampler, rng, lcfg)) for _ in range(3)]
    out["training"].append(case_signature(draw_case(sampler, rng, lcfg, concept=True)))
    out["training:next"] = int(rng.integers(2 ** 62))
    return out


# recorded with lib/training/data.py at commit b70bdab (before the package), on this file's volumes and seeds
GOLDEN = {
    "sources": ["real", "slic", "watershed", "window", "blob", "tube", "shell", "lesion", "synth"],
    "p": [
        0.309090909, 0.127272727, 0.072727273, 0.072727273, 0.109090909, 0.090909091, 0.054545455, 0.072727273,
        0.090909091,
    ],
    "structures": [
        [0, 1, "liver", 4], [0, 2, "spleen", 0], [0, 4, "aorta", 51], [0, 5, "vertebrae_L2", 29],
        [1, 1, "white_matter", 117], [1, 2, "grey_matter", 118], [1, 3, "brain_other", 119], [1, 1000, "brain", 89],
    ],
    "real": [
        ["real", "white_matter", 117, [72, 80, 64], [1.0, 1.0, 1.0], "0b7edb88cf93", 4311, [41943.7437, 19813.5191]],
        ["real", "brain_other", 119, [63, 70, 56], [1.1429, 1.1429, 1.1429],
         "8f4a407fcf37", 17785, [20690.6744, 8586.64011]],
    ],
    "real:raw": ["real", "brain", 89, [72, 80, 64], [1.0, 1.0, 1.0], "a25a63eb17f1", 47817, [30885.1822, 13303.8642]],
    "real:next": 3976106454125264933,
    "synth": [
        ["synth", "brain_other", 119, [80, 64, 72], [1.0, 1.0, 1.0], "480cde017947", 26492, [337379.376, 461434.83]],
        ["synth", "liver", 4, [51, 53, 34], [2.4118, 1.8113, 3.2353], "b4837499f410", 1956, [46314.1868, 23665.4688]],
    ],
    "synth:raw": ["synth", "liver", 4, [84, 80, 44], [1.5, 1.2, 2.5], "6cfff6cb9b61", 6311, [113384.395, 44331.5462]],
    "synth:next": 1511449951824616215,
    "slic": [
        ["slic", "", -1, [76, 72, 26], [1.5, 1.2, 2.5], "b38785dfd285", 675, [20028.9534, 5152.01867]],
        ["slic", "", -1, [43, 42, 17], [2.686, 2.1714, 4.4118], "0308f1608a04", 108, [1424.46049, 303.359163]],
    ],
    "slic:raw": ["slic", "", -1, [72, 80, 64], [1.0, 1.0, 1.0], "71667ba9504f", 2737, [30885.1822, 13303.8642]],
    "slic:next": 3427002649021939258,
    "watershed": [
        ["watershed", "", -1, [72, 80, 64], [1.0, 1.0, 1.0], "56a132f11f9c", 11459, [47446.637, 25586.5215]],
        ["watershed", "", -1, [37, 34, 42], [1.8919, 1.8824, 1.9048], "04af19140620", 66, [4554.23345, 1895.9415]],
    ],
    "watershed:raw": ["watershed", "", -1, [67, 80, 44], [1.5, 1.2, 2.5],
                      "ff6b3651423d", 2475, [26526.6883, 6326.17546]],
    "watershed:next": 965278077490970295,
    "window": [
        ["window", "", -1, [95, 22, 84], [0.7579, 3.6364, 0.7619], "56ac28ff4c93", 24821, [13009.5656, 4501.64934]],
        ["window", "", -1, [80, 44, 71], [1.2, 2.5, 1.5], "82fc94dc3dcd", 904, [28060.8609, 5659.22998]],
    ],
    "window:raw": ["window", "", -1, [72, 80, 64], [1.0, 1.0, 1.0], "77dc603a22b5", 2687, [30885.1822, 13303.8642]],
    "window:next": 3187804112728215812,
    "blob": [
        ["blob", "", -1, [80, 96, 44], [1.2, 1.5, 2.5], "fa4945ccf6e8", 4035, [8420.5008, 2269.90738]],
        ["blob", "", -1, [80, 92, 44], [1.2, 1.5, 2.5], "5c226ad57fd0", 2223, [250447.449, 197272.761]],
    ],
    "blob:raw": ["blob", "", -1, [72, 80, 64], [1.0, 1.0, 1.0], "ae907104d852", 10308, [39834.2344, 22849.6147]],
    "blob:next": 2779639048674377630,
    "tube": [
        ["tube", "", -1, [114, 62, 63], [0.6316, 1.2903, 1.0159], "881471b9eea7", 2058, [32407.3291, 10856.9439]],
        ["tube", "", -1, [68, 19, 54], [1.1765, 3.7895, 1.1852], "c2491fca600e", 710, [7774.54162, 3914.81081]],
    ],
    "tube:raw": ["tube", "", -1, [72, 80, 64], [1.0, 1.0, 1.0], "3373e7d24e7d", 3720, [31894.0495, 13952.5306]],
    "tube:next": 2762634425378686062,
    "shell": [
        ["shell", "", -1, [98, 82, 45], [1.4694, 1.1707, 2.4444], "54eb3bc6d50d", 1328, [39140.4751, 9018.72449]],
        ["shell", "", -1, [102, 114, 15], [0.7059, 0.7018, 4.2667], "9d920be90a52", 5304, [10484.2736, 4752.85042]],
    ],
    "shell:raw": ["shell", "", -1, [96, 80, 44], [1.5, 1.2, 2.5], "71391b0987cb", 4013, [32266.9863, 7298.53987]],
    "shell:next": 424921266055461117,
    "lesion": [
        ["lesion", "", -1, [42, 108, 131], [2.2857, 0.8565, 0.8588], "e6118a00c632", 649, [99823.1124, 24810.7821]],
        ["lesion", "", -1, [80, 20, 76], [0.9563, 4.32, 0.9539], "1b96d111123f", 160, [14012.9157, 3454.05332]],
    ],
    "lesion:raw": ["lesion", "", -1, [72, 60, 64], [1.0, 1.0, 1.0], "6ccba293d793", 183, [28482.468, 12796.9438]],
    "lesion:next": 1872847505738347323,
    "mixed": [
        ["blob", "", -1, [56, 63, 50], [1.2857, 1.2698, 1.28], "0bc2db2188d1", 33509, [106734.709, 206301.421]],
        ["blob", "", -1, [96, 129, 93], [0.75, 0.6202, 0.6882], "35147d3ad793", 8518, [124389.04, 58862.0727]],
        ["slic", "", -1, [64, 80, 72], [1.0, 1.0, 1.0], "613744e58816", 21345, [39761.7571, 21494.3561]],
        ["tube", "", -1, [54, 96, 102], [1.1852, 0.8333, 0.7059], "f4eb3169b8ee", 9434, [326053.35, 212590.018]],
        ["shell", "", -1, [53, 29, 64], [1.8113, 3.7931, 2.25], "6448ef99a580", 2503, [4565.57138, 648.245159]],
        ["slic", "", -1, [65, 64, 23], [1.5, 1.2, 2.5], "14464ba117d4", 650, [34235.3014, 16708.4686]],
    ],
    "mixed:next": 3990549178480330372,
    "concept": [
        ["concept", "grey_matter", 118, [64, 64, 64], [3.0, 3.0, 3.0], "ec55de823e0d", 636, [893.830231, 314.742131]],
        ["concept", "vertebrae_L2", 29, [32, 32, 32], [4.0, 4.0, 4.0], "dfdd808a47eb", 52, [1954.01933, 445.478985]],
    ],
    "concept:next": 851923937815595561,
    "held": [[0, 3, "kidney_left", 2]],
    "damped_p_volume": [0.8, 0.2],
    "damped": [
        ["real", "brain", 89, [72, 80, 64], [1.0, 1.0, 1.0], "a25a63eb17f1", 47817, [30885.1822, 13303.8642]],
        ["real", "spleen", 0, [73, 80, 44], [1.5, 1.2, 2.5], "63e54900e541", 1367, [29331.022, 6996.57474]],
        ["real", "brain", 89, [72, 80, 64], [1.0, 1.0, 1.0], "a25a63eb17f1", 47817, [30885.1822, 13303.8642]],
        ["real", "vertebrae_L2", 29, [79, 63, 44], [1.5, 1.2, 2.5], "584b61884864", 773, [30070.9707, 7210.23988]],
    ],
}

# recorded with lib/training/pretrain.py and data.py at commit b70bdab, as GOLDEN
GOLDEN_PRETRAIN = {
    "validation": [
        ["heldout", "kidney_left", -1, 1572889066, [[10.167, 14.907, 13.038], [50.463, 48.093, 52.423]], [2, 3],
         "7a2cf9d4cb1b", 10036, [112988.451, 51755.4202]],
        ["heldout_click", "kidney_left", -1, 263030910, [[31.5, 32.5, 29.5]], [1],
         "993a7c240784", 2904, [95109.3576, 41365.8577]],
        ["window", "window", -1, 53923186, [[10.447, 12.676, 11.207], [50.868, 50.324, 51.793]], [2, 3],
         "471b67616893", 3941, [38118.563, 15961.8509]],
        ["blob", "blob", -1, 1296169275, [[19.864, 17.924, 21.803], [45.076, 45.076, 43.136]], [2, 3],
         "162a87562f36", 6730, [150245.881, 105214.578]],
        ["tube", "tube", -1, 1031716472, [[10.681, 12.833, 14.329], [52.319, 50.167, 48.671]], [2, 3],
         "26c16b1eaf5e", 12359, [158971.347, 106557.544]],
        ["concept", "aorta", 51, 0, [], [], "a643fbef48d4", 96, [14861.9907, 7766.824]],
    ],
    "training": [
        ["tube", "", -1, 0, [[31.5, 30.907, 30.269]], [1], "8d834b5d1323", 4932, [91100.9054, 44963.9655]],
        ["blob", "", -1, 0, [[20.752, 23.82, 12.0], [49.576, 49.42, 40.0]], [2, 3],
         "09e6d9a94ed0", 10000, [45084.2752, 25719.7422]],
        ["real", "liver", -1, 0, [[13.038, 11.386, 12.106], [52.423, 51.614, 52.833]], [2, 3],
         "f1f66f90477c", 26086, [68996.6973, 22895.9888]],
        ["concept", "liver", 4, 0, [], [], "f319a40f73a6", 1042, [23491.8366, 9777.04194]],
    ],
    "training:next": 3199972096019576254,
}


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    return draw_all(tmp_path_factory.mktemp("segmaps"))


def _is_sample(x) -> bool:
    return isinstance(x, list) and len(x) in (8, 9) and isinstance(x[0], str) and isinstance(x[-1], list)


def _same(a, b, where: str) -> None:
    if _is_sample(b):  # exact, but for the image moments (float sums: a tolerance)
        assert _is_sample(a) and a[:-1] == b[:-1], (where, a, b)
        assert np.allclose(a[-1], b[-1], rtol=1e-5, atol=1e-3), (where, a[-1], b[-1])
    elif isinstance(b, list) and b and _is_sample(b[0]):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_samples_are_those_of_the_single_module_at_the_same_seeds(drawn):
    assert set(drawn) == set(GOLDEN)
    for key, want in GOLDEN.items():
        _same(drawn[key], want, key)


def test_pretraining_cases_are_those_of_the_single_module_at_the_same_seeds():
    drawn = pretrain_cases()
    assert set(drawn) == set(GOLDEN_PRETRAIN)
    for key, want in GOLDEN_PRETRAIN.items():
        _same(drawn[key], want, key)


def test_every_source_is_registered_once_by_name_in_its_family_module():
    from lib.training.data.sources import NEEDS

    # "hippocampus" (a committed multi-subject set, drawn apart from the volumes: tests/test_hippocampus_data.py)
    assert set(D.SOURCES) == set(SOURCE_ORDER) | {"hippocampus"} and set(D.SOURCE_WEIGHTS) < set(D.SOURCES)
    for name in ("synth", "hippocampus"):  # registered, drawn only when source_weights names it
        assert name not in D.SOURCE_WEIGHTS
    family = {s.name: s.draw.__module__.rsplit(".", 1)[1] for s in D.SOURCES.values()}
    assert family == {"real": "labelled", "synth": "labelled", "slic": "pseudo", "watershed": "pseudo",
                      "window": "pseudo", "blob": "synthetic", "tube": "synthetic", "shell": "synthetic",
                      "lesion": "synthetic", "hippocampus": "cohorts"}
    assert {s.needs for s in D.SOURCES.values()} <= set(NEEDS)
    with pytest.raises(ValueError, match="registered twice"):
        D.register_source("blob")(lambda sampler, rng: None)
    with pytest.raises(ValueError, match="unknown need"):
        D.register_source("new_source", needs="gpu")


def test_weights_name_registered_sources_and_unmet_needs_are_left_out():
    ct = ct_volume()
    with pytest.raises(ValueError, match=r"unknown sample sources \['blobs'\]"):
        D.ObjectSampler([ct], weights={"real": 1.0, "blobs": 1.0})
    s = D.ObjectSampler([ct], weights={"real": 1.0, "synth": 1.0, "slic": 1.0, "blob": 2.0})
    assert s.sources == ["real", "synth", "blob"] and np.allclose(s.p, [0.25, 0.25, 0.5])  # no supervoxel maps
    unlabelled = D.make_volume("unlabelled", ct.image, ct.affine, rng=np.random.default_rng(0))
    s = D.ObjectSampler([unlabelled], weights={"real": 1.0, "synth": 1.0, "window": 1.0})
    assert s.sources == ["window"] and s.draw("synth", np.random.default_rng(0)) is None
    with pytest.raises(RuntimeError, match="could not draw"):
        s.sample(np.random.default_rng(0), source="real", tries=3)


def test_a_registered_source_is_drawn_by_its_weight():
    from lib.training.data.sources.registry import SOURCES

    ct = ct_volume()

    @D.register_source("cube_for_test")
    def cube(sampler, rng):
        v = sampler.volumes[0]
        c = sampler.pick_seed(v, rng)
        region = D.region_around(v.image.shape, c - 2, c + 2, v.spacing, rng)
        m = np.zeros([r.stop - r.start for r in region], bool)
        m[tuple(slice(int(x - r.start) - 2, int(x - r.start) + 3) for x, r in zip(c, region))] = True
        return sampler.finish(v, region, m, "cube_for_test")

    try:
        s = D.ObjectSampler([ct], weights={"cube_for_test": 1.0})
        smp = s.sample(np.random.default_rng(0), aug=False)
        assert smp.kind == "cube_for_test" and smp.mask.sum() == 125 and smp.image.shape == smp.mask.shape
    finally:
        del SOURCES["cube_for_test"]


def test_concept_windows_take_spacing_and_size_from_the_contract():
    c = Contract()
    assert (D.CONCEPT_SPACING, D.CONCEPT_WINDOW) == (c.label_spacing_mm, c.model_shape[0])
    s = D.ObjectSampler([ct_volume()])
    smp, vid = s.concept_window(np.random.default_rng(0), aug=False)
    assert smp.image.shape == (c.model_shape[0],) * 3 and np.all(smp.spacing == c.label_spacing_mm)
    assert vid == smp.label_id >= 0 and smp.mask.any()


def test_lone_click_validation_on_large_structures_only():
    """build_large_click_validation (stop 36): one-click cases in the engine's lone-click view, only on training
    structures at least val_large_view x that view (here 0.6 x 64 mm), deterministic, none when 0."""
    from lib.training.pretrain import PretrainConfig, build_large_click_validation

    vols = [ct_volume(), mr_volume()]
    cfg = PretrainConfig(val_click_large=2, val_large_view=0.6)
    lcfg = cfg.loop_config()
    cases = build_large_click_validation(vols, cfg, lcfg)
    names = {c.name for c in cases}
    assert {"liver", "aorta", "grey_matter", "brain_other"} <= names  # extents 41-92 mm
    assert not names & {"spleen", "vertebrae_L2", "white_matter", "kidney_left"}  # under 38 mm, or held out
    assert all(c.kind == "large_click" and list(c.types) == [1] and c.prev is None and c.gt.any() for c in cases)
    again = build_large_click_validation(vols, cfg, lcfg)
    assert [case_signature(c) for c in cases] == [case_signature(c) for c in again]
    assert build_large_click_validation(vols, PretrainConfig(), lcfg) == []
