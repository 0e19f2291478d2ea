"""Issue 28: the interactive session's refactoring changed no answer. A fixed set of HTTP requests (a box, a lone
click and two corrective clicks through one session, several boxes, an undo, strokes, a request without a session)
sent to the real server over the two sample volumes of the evaluation set; every answer's mask must be
voxel-identical to the one the code before the change gave (``tests/data/http_answers.json``: shape, voxels and
SHA-256 of the mask's bytes in C order, recorded from commit 240ac4f with ``ENSAM_RECORD_ANSWERS=1``). New weights
change answers: release 7 (2026-12-07, a new refiner) re-recorded the file, and exactly the refiner's answers
changed (the two corrective clicks and the undo back to the first of them); the five answers of the main weights
(boxes, lone clicks, strokes) stayed identical to 240ac4f's.

Recording: ``ENSAM_RECORD_ANSWERS=1 pytest tests/test_http_identical.py`` writes the file instead of comparing."""

from __future__ import annotations

import hashlib
import io
import json
import os

import nibabel as nib
import numpy as np
import pytest
import requests

from lib.prompts.simulation import box_from_mask, next_click
from test_http_ground_truth import EVAL, gt_server  # noqa: F401 (the server over the evaluation set: a fixture)

TIMEOUT = 300
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "http_answers.json")
RECORD = os.environ.get("ENSAM_RECORD_ANSWERS") == "1"

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(EVAL, "dataset.json")),
                                reason="the evaluation set is not fetched (make data)")


def _digest(mask: np.ndarray) -> dict:
    m = np.ascontiguousarray(np.asarray(mask), dtype=np.uint8)
    return {"shape": list(m.shape), "voxels": int(np.count_nonzero(m)),
            "sha256": hashlib.sha256(m.tobytes()).hexdigest()}


def _answer(resp) -> tuple:
    from lib.io.infer_answer import read_answer

    assert resp.status_code == 200, resp.text[:500]
    vol, params = read_answer(resp.content, resp.headers.get("content-type", ""))
    return np.asarray(vol.array), params


def _infer(server, image, params, model="ensam", files=None):
    return _answer(requests.post(f"{server.url}/infer/{model}", params={"image": image, "output": "all"},
                                 data={"params": json.dumps(params)}, files=files, timeout=TIMEOUT))


def _requests(server):
    """[(name, mask)] of the fixed requests, in order (later ones build on the sessions of earlier ones)."""
    out = []
    _, lab, aff, ids = server.images["ct_dicom"]
    liver, spleen = lab == ids["liver"], lab == ids["spleen"]
    box = box_from_mask(liver, jitter=2, rng=5).tolist()
    out.append(("ct box liver", _infer(server, "ct_dicom", {"roi": box, "label": "liver", "client_id": "id-box",
                                                           "reset_state": True})[0]))
    boxes = [box_from_mask(m, jitter=1, rng=n).tolist() for n, m in enumerate((liver, spleen))]
    out.append(("ct two boxes", _infer(server, "ct_dicom", {"boxes": boxes, "label": "organs", "client_id": "id-2",
                                                           "reset_state": True})[0]))
    # a lone click, then two corrective clicks of the evaluator through one session, then an undo
    _, mlab, maff, mids = server.images["mr"]
    kidney = mlab == mids["kidney_right"]
    rng = np.random.default_rng(7)
    first, _ = next_click(None, kidney, rng)
    fg, bg = [first.tolist()], []
    mask = _infer(server, "mr", {"foreground": fg, "label": "kidney_right", "client_id": "id-click",
                                 "reset_state": True})[0]
    out.append(("mr click", mask))
    for n in range(2):
        click = next_click(mask > 0, kidney, rng)
        (fg if click[1] else bg).append(click[0].tolist())
        mask = _infer(server, "mr", {"foreground": fg, "background": bg, "label": "kidney_right",
                                     "client_id": "id-click"})[0]
        out.append((f"mr correction {n + 1}", mask))
    out.append(("mr undo", _infer(server, "mr", {"undo": True, "label": "kidney_right", "client_id": "id-click"})[0]))
    # OHIF's way: no label, no client id, every click re-sent; a .nrrd answer
    liv = mlab == mids["liver"]
    c = next_click(None, liv, np.random.default_rng(3))[0].tolist()
    out.append(("mr ohif click", _infer(server, "mr", {"foreground": [c], "background": [], "result_extension":
                                                      ".nrrd", "result_dtype": "uint8"})[0]))
    # strokes (3D Slicer's scribbles): a foreground stroke through the liver's centre, a background one beside it
    centre = np.argwhere(liv).mean(0).round().astype(int)
    strokes = np.zeros(mlab.shape, np.uint8)
    strokes[centre[0] - 5:centre[0] + 6, centre[1], centre[2]] = 3
    side = np.argwhere(~liv[:, :, centre[2]] & (mlab[:, :, centre[2]] == 0))
    far = side[np.argmax(np.abs(side - centre[:2]).sum(1))]
    strokes[max(far[0] - 3, 0):far[0] + 4, far[1], centre[2]] = 2
    buf = io.BytesIO(nib.Nifti1Image(strokes, maff).to_bytes())
    params = {"roi": [], "selected_label_name": "liver", "client_id": "id-scribbles", "reset_state": True,
              "label_info": [{"name": "liver", "id": 1}, {"name": "background_scribbles", "id": 2},
                             {"name": "foreground_scribbles", "id": 3}]}
    out.append(("mr scribbles", _infer(server, "mr", params, "ensam_scribbles",
                                       {"label": ("tmpstrokes.nii", buf.getvalue(), "application/octet-stream")})[0]))
    return out


def test_answers_are_voxel_identical_to_before(gt_server):  # noqa: F811
    got = {name: _digest(mask) for name, mask in _requests(gt_server)}
    if RECORD:
        os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
        with open(FIXTURE, "w") as f:
            json.dump(got, f, indent=1)
        pytest.skip(f"recorded {len(got)} answers in {FIXTURE}")
    with open(FIXTURE) as f:
        want = json.load(f)
    assert list(got) == list(want)
    assert all(d["voxels"] > 0 for n, d in want.items() if n != "mr undo")
    changed = {n: (want[n], got[n]) for n in want if got[n] != want[n]}
    assert not changed, changed
