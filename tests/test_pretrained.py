"""The shipped weights: a plain state_dict (weights_only=True, <= 25 MB) that segments a real organ of the
evaluation CT from a box better than an untrained network of the same architecture can."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.engine import EnsamEngine, load_network
from lib.evaluation.metrics import dice as _dice
from lib.network import build_network
from lib.prompts.simulation import box_from_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "apps", "ensam", "model", "pretrained_ensam.pt")
EVAL = os.path.join(ROOT, "sample-datasets", "eval")
# A floor between what an untrained network of this architecture reaches from the same box (which, through the
# prompt prior, is about "fill the box") and what the shipped weights reach; measured values in the model card.
# (A vertebra: a box around it holds bone, disc and muscle, so filling the box is far from the answer. On large
# organs that fill their box, e.g. liver and spleen, box filling is hard to beat from a tight box.)
STRUCTURE, FLOOR = "vertebrae_T12", 0.50

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(EVAL, "dataset.json")),
                                reason="sample data not fetched (make data)")


def test_weights_file_is_small_and_loads_with_weights_only():
    """<= 25 MB, read by torch.load(weights_only=True): a plain state_dict (releases 1-3) or one artefact holding
    the state_dict with its network, contract and vocabulary (lib.weights, release 4 on)."""
    assert os.path.getsize(WEIGHTS) <= 25 * 2 ** 20
    obj = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    state = obj["state_dict"] if "format" in obj else obj
    if "format" in obj:
        assert {"network", "contract", "vocabulary"} <= set(obj["meta"])
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    net = load_network(WEIGHTS)
    assert sum(p.numel() for p in net.parameters()) == sum(v.numel() for k, v in state.items()
                                                          if k in dict(net.named_parameters()))


def test_box_on_a_real_organ_beats_an_untrained_network():
    torch.set_num_threads(2)
    meta = json.load(open(os.path.join(EVAL, "dataset.json")))
    case = next(c for c in meta["testing"] if "ct_dicom" in c["image"])
    label_id = next(int(k) for k, v in case["labels"].items() if v == STRUCTURE)
    img = nib.load(os.path.join(EVAL, case["image"]))
    image = np.asarray(img.dataobj)
    gt = np.asarray(nib.load(os.path.join(EVAL, case["label"])).dataobj) == label_id
    box = box_from_mask(gt, jitter=0).tolist()

    trained = EnsamEngine(weights=WEIGHTS)
    d_trained = _dice(trained.segment(image, img.affine, boxes=[box]) > 0, gt)
    torch.manual_seed(0)
    untrained = EnsamEngine(network=build_network(trained.network.config))
    d_untrained = _dice(untrained.segment(image, img.affine, boxes=[box]) > 0, gt)
    print(f"{STRUCTURE}: trained DSC {d_trained:.3f}, untrained {d_untrained:.3f}, floor {FLOOR}")
    assert d_untrained < FLOOR <= d_trained


def _eval_case(name):
    meta = json.load(open(os.path.join(EVAL, "dataset.json")))
    case = next(c for c in meta["testing"] if name in c["image"])
    img = nib.load(os.path.join(EVAL, case["image"]))
    labels = np.asarray(nib.load(os.path.join(EVAL, case["label"])).dataobj)
    return np.asarray(img.dataobj), img.affine, labels, {v: int(k) for k, v in case["labels"].items()}


def test_a_foreground_click_in_a_missed_region_adds_that_region():
    """After a box on the evaluation CT's stomach, the evaluator's corrective click falls in a missed part; the
    clicked voxel must be in the new mask and the missed component around it must shrink."""
    from scipy import ndimage

    from lib.prompts.simulation import next_click

    torch.set_num_threads(2)
    image, affine, labels, ids = _eval_case("ct_dicom")
    gt = labels == ids["stomach"]
    box = box_from_mask(gt, jitter=0).tolist()
    eng = EnsamEngine(weights=WEIGHTS)
    m0 = eng.segment(image, affine, boxes=[box]) > 0
    pt, is_fg = next_click(m0, gt, np.random.default_rng(0))
    assert is_fg, "the largest error of the box answer is expected to be a missed part"
    missed, _ = ndimage.label(gt & ~m0)
    comp = missed == missed[tuple(pt)]
    m1 = eng.segment(image, affine, boxes=[box], points=[pt], point_labels=[1], prev_mask=m0) > 0
    gained = int((m1 & comp).sum())
    print(f"stomach: box DSC {_dice(m0, gt):.3f} -> {_dice(m1, gt):.3f} after one click; "
          f"{gained} of the {int(comp.sum())} missed voxels around the click added")
    assert m1[tuple(pt)] and gained >= 0.3 * comp.sum()


def test_test_time_flips_are_mirror_equivariant():
    """EngineConfig.tta_flips averages the plain and flipped views (each cached); with the shipped weights, the
    mirrored CT with the mirrored box and click gets the mirrored answer (prompts flipped wrongly break this: points
    left unflipped gave DSC 0.96 here)."""
    from lib.engine import EngineConfig

    torch.set_num_threads(2)
    image, affine, labels, ids = _eval_case("ct_dicom")
    gt = labels == ids["stomach"]
    n0 = image.shape[0]
    box = box_from_mask(gt, jitter=0).tolist()
    click = np.argwhere(gt)[len(np.argwhere(gt)) // 2].tolist()
    cfg = EngineConfig(tta_flips=((0,),))  # the views {plain, flip 0} are the same set for the mirrored image
    eng = EnsamEngine(weights=WEIGHTS, config=cfg)
    m = eng.segment(image, affine, boxes=[box], points=[click], point_labels=[1]) > 0
    # two views encoded, each cached; weights with a refiner encode each view with it too (EngineConfig.refiner_warm)
    assert eng.cache.misses == 2 * (2 if eng.refiner is not None and cfg.refiner_warm else 1)
    plain = EnsamEngine(weights=WEIGHTS).segment(image, affine, boxes=[box], points=[click], point_labels=[1]) > 0
    mbox = [n0 - 1 - box[1], n0 - 1 - box[0]] + box[2:]
    mclick = [n0 - 1 - click[0]] + click[1:]
    m2 = EnsamEngine(weights=WEIGHTS, config=cfg).segment(image[::-1].copy(), affine, boxes=[mbox], points=[mclick],
                                                          point_labels=[1]) > 0
    print(f"stomach: views change {(plain != m).sum()} voxels; mirrored answer DSC {_dice(m2[::-1], m):.4f}")
    assert (plain != m).sum() > 100
    assert _dice(m2[::-1], m) > 0.995
