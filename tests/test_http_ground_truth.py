"""Issue 26: every HTTP answer opened and compared with the reference label (not just its shape or the clicked voxel).

A server of its own (app copy with the shipped weights; no other test trains it) on the two real volumes of the
evaluation set (the CT as 512 x 512 x 20 at 0.98 x 0.98 x 2 mm, the MR at 3 mm), requests as Slicer and OHIF send
them. Each answer's DSC against the reference label must reach a floor (the shipped weights' DSC on that structure
through this server, measured and printed by these tests on 2026-12-06, release 6, minus MARGIN; release 7 changed
only the refiner and was published only after passing these floors: 2026-12-07, corrected CT liver 0.952, MR liver
0.866) and beat the classical graph cut on the same prompts. An untrained network, prompts shifted in the
geometry, or empty masks fail here. (The synthetic blobs of the other server tests are too easy for this: graph
cut scores 1.0 on them.) The server runs in float32 (``--conf bf16 off``), as the floors were measured: on a CPU with
bf16 units the default engine autocasts to bf16, which moves small answers by a few voxels."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import ROOT, _copy_app, serve
from lib.evaluation.baselines import make_baseline
from lib.evaluation.metrics import dice
from lib.prompts.simulation import box_from_mask, next_click

TIMEOUT = 180
EVAL = os.path.join(ROOT, "sample-datasets", "eval")
MARGIN = 0.05
# (image, structure) -> DSC measured through this server with release 6 (2026-12-06, 2 threads): box (jitter 2),
# lone click at the deepest voxel, that click + 3 corrective clicks (the lone click on a large organ is issue 27)
MEASURED = {
    ("ct_dicom", "liver"): {"box": 0.956, "click": 0.014, "corrected": 0.954},
    ("ct_dicom", "spleen"): {"box": 0.877, "click": 0.073, "corrected": 0.945},
    ("ct_dicom", "stomach"): {"box": 0.796, "click": 0.011, "corrected": 0.498},
    ("ct_dicom", "vertebrae_T12"): {"box": 0.703, "click": 0.328, "corrected": 0.58},
    ("mr", "liver"): {"box": 0.804, "click": 0.011, "corrected": 0.78},
    ("mr", "kidney_right"): {"box": 0.884, "click": 0.637, "corrected": 0.908},
}


@pytest.fixture(scope="module")
def gt_server(tmp_path_factory):
    meta = json.load(open(os.path.join(EVAL, "dataset.json")))
    work = str(tmp_path_factory.mktemp("gt_server"))
    app_dir = _copy_app(os.path.join(work, "app"))
    studies = os.path.join(work, "studies")
    os.makedirs(studies)
    images = {}
    for case in meta["testing"]:
        name = os.path.basename(case["image"]).replace(".nii.gz", "")
        shutil.copy(os.path.join(EVAL, case["image"]), os.path.join(studies, f"{name}.nii.gz"))
        img = nib.load(os.path.join(EVAL, case["image"]))
        lab = np.asarray(nib.load(os.path.join(EVAL, case["label"])).dataobj)
        images[name] = (np.asarray(img.dataobj), lab, img.affine, {v: int(k) for k, v in case["labels"].items()})
    # float32 (`--conf bf16 off`): the answers then do not depend on whether this CPU has bf16 units (the floors were
    # measured on a CPU without them; tests/test_http_identical.py compares voxels with a recording)
    yield from serve(work, app_dir, studies, images, "--conf", "bf16", "off")


def _answer(resp) -> tuple:
    """(mask, params) of an ``output=all`` answer."""
    from lib.io.infer_answer import read_answer

    assert resp.status_code == 200, resp.text[:500]
    vol, params = read_answer(resp.content, resp.headers.get("content-type", ""))
    return np.asarray(vol.array), params


def _infer(server, image, params):
    return _answer(requests.post(f"{server.url}/infer/ensam", params={"image": image, "output": "all"},
                                 data={"params": json.dumps(params)}, timeout=TIMEOUT))


def _graphcut(img, aff, boxes=(), points=(), labels=(), prev=None) -> np.ndarray:
    return make_baseline("graphcut").predict(img, aff, [np.asarray(b) for b in boxes],
                                             np.asarray(points, dtype=np.int64).reshape(-1, 3),
                                             np.asarray(labels, dtype=np.int64).reshape(-1), prev) > 0


RESULTS: dict = {}  # kind -> [(ensam DSC, graph cut DSC)], filled by the tests above the summary test


def _check(what: str, image: str, name: str, kind: str, got: float, classical: float) -> None:
    floor = MEASURED[(image, name)][kind] - MARGIN
    print(f"\n{what} {image} {name} {kind}: DSC {got:.3f} (floor {floor:.3f}), graph cut {classical:.3f}")
    RESULTS.setdefault(kind if what != "batch manifest" else "manifest", []).append((got, classical))
    assert got >= floor, (what, image, name, kind, got, floor)


@pytest.mark.parametrize("image, name", list(MEASURED))
def test_box_answers_match_the_label(gt_server, image, name):
    img, lab, aff, ids = gt_server.images[image]
    gt = lab == ids[name]
    box = box_from_mask(gt, jitter=2, rng=ids[name]).tolist()
    mask, params = _infer(gt_server, image, {"roi": box, "label": name, "client_id": "gt-box", "reset_state": True})
    assert params["label_names"] == {name: 1}
    _check("slicer roi", image, name, "box", dice(mask > 0, gt), dice(_graphcut(img, aff, boxes=[box]), gt))


@pytest.mark.parametrize("image, name", list(MEASURED))
def test_click_then_corrections_match_the_label(gt_server, image, name):
    """A lone click at the deepest voxel (OHIF / Slicer's first Deepgrow click), then three of the evaluator's
    corrective clicks through one session: the first answer and the corrected one are scored."""
    img, lab, aff, ids = gt_server.images[image]
    gt = lab == ids[name]
    rng = np.random.default_rng(ids[name])
    first, _ = next_click(None, gt, rng)
    fg, bg = [first.tolist()], []
    mask, params = _infer(gt_server, image, {"foreground": fg, "label": name, "client_id": "gt-click",
                                              "reset_state": True})
    _check("lone click", image, name, "click", dice(mask > 0, gt), dice(_graphcut(img, aff, points=fg, labels=[1]),
                                                                        gt))
    for _ in range(3):
        click = next_click(mask > 0, gt, rng)
        if click is None:
            break
        (fg if click[1] else bg).append(click[0].tolist())
        # as 3D Slicer does: every click so far (its fiducials) with the session's previous answer
        mask, params = _infer(gt_server, image, {"foreground": fg, "background": bg, "label": name,
                                                  "client_id": "gt-click"})
    assert params["session"]["step"] >= 2
    g = _graphcut(img, aff, points=fg + bg, labels=[1] * len(fg) + [0] * len(bg))
    _check("3 corrections", image, name, "corrected", dice(mask > 0, gt), dice(g, gt))


def test_several_boxes_answer_each_object(gt_server):
    img, lab, aff, ids = gt_server.images["ct_dicom"]
    names = ["liver", "spleen"]
    boxes = [box_from_mask(lab == ids[n], jitter=1, rng=ids[n]).tolist() for n in names]
    mask, params = _infer(gt_server, "ct_dicom", {"boxes": boxes, "label": "organs", "reset_state": True,
                                                  "client_id": "gt-boxes"})
    assert params["prompts"]["boxes"] == 2
    for n, box in zip(names, boxes):
        inside = np.zeros(mask.shape, bool)
        inside[box[0]:box[1] + 1, box[2]:box[3] + 1, box[4]:box[5] + 1] = True
        gt = lab == ids[n]
        _check("several boxes", "ct_dicom", n, "box", dice((mask > 0) & inside, gt),
               dice(_graphcut(img, aff, boxes=[box]), gt))


def test_batch_with_a_manifest_writes_each_object(gt_server):
    picked = {"ct_dicom": ["liver", "stomach"], "mr": ["liver", "kidney_right"]}
    manifest = {}
    for image, names in picked.items():
        _, lab, _, ids = gt_server.images[image]
        manifest[image] = [{"label": n, "roi": box_from_mask(lab == ids[n], jitter=1, rng=ids[n]).tolist()}
                           for n in names]
    r = requests.post(f"{gt_server.url}/batch/infer/ensam", params={"images": "all", "run_sync": "true"},
                      json={"manifest": manifest, "label_tag": "gt_batch"}, timeout=900)
    assert r.status_code == 200, r.text
    for image, objects in manifest.items():
        img, lab, aff, ids = gt_server.images[image]
        out = np.asarray(nib.load(os.path.join(gt_server.studies, "labels", "gt_batch", f"{image}.nii.gz")).dataobj)
        written = r.json()[image]["label_names"]
        for obj in objects:
            gt = lab == ids[obj["label"]]
            _check("batch manifest", image, obj["label"], "box", dice(out == written[obj["label"]], gt),
                   dice(_graphcut(img, aff, boxes=[obj["roi"]]), gt))


@pytest.mark.parametrize("kind", ["box", "corrected", "manifest",
                                  pytest.param("click", marks=pytest.mark.xfail(
                                      strict=True, reason="issue 27: a lone click answers about a third of the view "
                                                          "(release 6); graph cut does better on these organs"))])
def test_the_mean_over_structures_beats_graph_cut(kind):
    pairs = RESULTS.get(kind)
    assert pairs, f"no {kind} answer was scored (run the whole file)"
    ours, theirs = np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])
    print(f"\n{kind}: mean DSC over {len(pairs)} answers {ours:.3f}, graph cut {theirs:.3f}")
    assert ours > theirs, (kind, ours, theirs)
