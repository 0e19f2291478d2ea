"""``ensam_scribbles`` over HTTP (issue 12): a real server (``ensam_server`` in conftest.py) and the request exactly
as 3D Slicer's MONAI Label module sends it (``onUpdateScribbles`` in plugins/slicer/MONAILabel/MONAILabel.py,
Project-MONAI/MONAILabel): every segment exported as one labelmap on the image's grid and saved by ITK as .nii.gz,
uploaded as the multipart file ``label`` by monailabel's client (the same client code the module ships), with
``params`` = the model's config (first values) + ``roi`` + ``label_info`` + ``selected_label_name``, and
``result_extension=".nrrd"``, ``result_dtype="uint8"``; the client adds ``client_id``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from monailabel.client import MONAILabelClient

TIMEOUT = 120
IMAGE = "vol2"
LABEL_INFO = [{"name": "blob_a", "id": 1}, {"name": "blob_b", "id": 2}, {"name": "background_scribbles", "id": 3},
              {"name": "foreground_scribbles", "id": 4}]  # two segments, then the strokes: Slicer numbers them 1..4


def _save_like_slicer(arr: np.ndarray, affine: np.ndarray, path: str) -> str:
    """A labelmap written as Slicer's ``saveNode`` writes it: ITK's NIfTI writer, LPS geometry."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.astype(np.uint8).transpose(2, 1, 0)))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    sitk.WriteImage(img, path, True)
    return path


def _slicer_params(server, roi=(), selected="blob_a") -> dict:
    info = requests.get(f"{server.url}/info/", timeout=TIMEOUT).json()
    params = {k: v[0] if isinstance(v, list) else v
              for k, v in info["models"]["ensam_scribbles"]["config"].items()}  # getParamsFromConfig
    params.update({"roi": list(roi), "label_info": LABEL_INFO, "selected_label_name": selected,
                   "result_extension": ".nrrd", "result_dtype": "uint8"})
    return params


def _strokes(server, fg=True, bg=True):
    """(labelmap, fg stroke mask, bg stroke mask): the segments as the scene holds them, strokes painted on top in
    one axial slice (later segments win in Slicer's export)."""
    img, lab, aff = server.images[IMAGE]
    out = lab.astype(np.uint8).copy()  # the segments: blob_a = 1, blob_b = 2
    c = np.argwhere(lab == 1).mean(0).round().astype(int)  # blob_a's centre
    fg_m = np.zeros(lab.shape, bool)
    bg_m = np.zeros(lab.shape, bool)
    if fg:
        fg_m[c[0] - 4:c[0] + 5, c[1] - 1:c[1] + 1, c[2]] = True  # a 2-voxel-wide stroke along i
    if bg:
        bg_m[c[0] - 4:c[0] + 5, min(c[1] + 9, lab.shape[1] - 2):min(c[1] + 11, lab.shape[1]), c[2]] = True
        bg_m &= lab == 0
    out[bg_m] = 3
    out[fg_m] = 4
    return out, fg_m, bg_m


def _post(server, params, label_bytes=None, name="tmpscrib.nii.gz", image=IMAGE):
    files = {"label": (name, label_bytes, "application/octet-stream")} if label_bytes is not None else None
    return requests.post(f"{server.url}/infer/ensam_scribbles", params={"image": image, "output": "json"},
                         data={"params": json.dumps(params)}, files=files, timeout=TIMEOUT)


def test_info_offers_a_scribbles_task(ensam_server):
    info = MONAILabelClient(ensam_server.url).info()
    task = info["models"]["ensam_scribbles"]
    assert task["type"] == "scribbles" and task["dimension"] == 3
    assert "device" in task["config"]  # the same options as the interactive task


def test_slicer_scribbles_then_background_correction(ensam_server, tmp_path):
    img, lab, aff = ensam_server.images[IMAGE]
    client = MONAILabelClient(ensam_server.url, tmpdir=str(tmp_path), client_id="slicer-scribbles")
    labelmap, fg_m, bg_m = _strokes(ensam_server)
    path = _save_like_slicer(labelmap, aff, str(tmp_path / "tmpab12cd.nii.gz"))
    out, res = client.infer("ensam_scribbles", IMAGE, _slicer_params(ensam_server), label_in=path)
    assert out.endswith(".nrrd")
    mask = sitk.GetArrayFromImage(sitk.ReadImage(out)).transpose(2, 1, 0)
    assert mask.shape == img.shape and set(np.unique(mask)) <= {0, 1}
    assert res["label_names"] == {"blob_a": 1} and res["session"]["step"] == 1 and not res["previous_mask"]
    s = res["strokes"]
    assert s["foreground_value"] == 4 and s["background_value"] == 3
    assert s["foreground_voxels"] == int(fg_m.sum()) and s["background_voxels"] == int(bg_m.sum())
    assert s["foreground_points"] >= 2 and s["background_points"] >= 1
    assert res["prompts"]["foreground"] == s["foreground_points"]
    # the strokes are prompts of the network: the mask covers the foreground stroke and avoids the background one
    # (with any weights: the prompt prior puts +/- blobs at the sampled points; an axis mix-up anywhere between the
    # ITK-written upload, the conversion and the answer would miss these off-centre strokes)
    assert mask[fg_m].mean() >= 0.8, f"{mask[fg_m].mean():.2f} of the foreground stroke is in the mask"
    assert mask[bg_m].mean() <= 0.2, f"{mask[bg_m].mean():.2f} of the background stroke is in the mask"

    # background strokes alone correct the previous result of this client and segment (shared with `ensam`)
    labelmap2, _, bg2 = _strokes(ensam_server, fg=False)
    path2 = _save_like_slicer(labelmap2, aff, str(tmp_path / "tmpef34gh.nii.gz"))
    out2, res2 = client.infer("ensam_scribbles", IMAGE, _slicer_params(ensam_server), label_in=path2)
    assert res2["previous_mask"] is True and res2["session"]["step"] == 2
    assert res2["strokes"]["foreground_points"] == 0 and res2["strokes"]["background_points"] >= 1
    # ... and the interactive task sees the same session: undo goes back to the scribbles' first result
    r = requests.post(f"{ensam_server.url}/infer/ensam", params={"image": IMAGE, "output": "json"},
                      data={"params": json.dumps({"label": "blob_a", "client_id": "slicer-scribbles", "undo": True})},
                      timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["session"]["step"] == 1


BAD = {
    "wrong shape": (lambda lm: lm[:, :, :-1], 422, "shape"),
    "no foreground stroke": (lambda lm: np.where(lm == 4, 0, lm), 422, "no foreground stroke"),
    "unknown values": (lambda lm: np.where(lm == 3, 7, lm), 422, "unknown value"),
    "no stroke at all": (lambda lm: np.zeros_like(lm), 422, "no stroke"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_stroke_volumes_are_4xx_and_change_nothing(ensam_server, tmp_path, case):
    _, _, aff = ensam_server.images[IMAGE]
    labelmap, _, _ = _strokes(ensam_server)
    change, status, words = BAD[case]
    path = _save_like_slicer(change(labelmap), aff, str(tmp_path / "tmpbad.nii.gz"))
    params = {**_slicer_params(ensam_server), "client_id": f"bad-{case}"}
    with open(path, "rb") as f:
        r = _post(ensam_server, params, f.read())
    assert r.status_code == status and words in r.json()["detail"], r.text
    # nothing was recorded for that client: a later valid request is its first step
    good = _save_like_slicer(labelmap, aff, str(tmp_path / "tmpgood.nii.gz"))
    with open(good, "rb") as f:
        r = _post(ensam_server, {**params, "reset_state": False}, f.read())
    assert r.status_code == 200 and r.json()["session"]["step"] == 1 and r.json()["previous_mask"] is False


def test_other_bad_requests_are_4xx_and_the_server_stays_up(ensam_server, tmp_path):
    _, _, aff = ensam_server.images[IMAGE]
    labelmap, _, _ = _strokes(ensam_server)
    params = {**_slicer_params(ensam_server), "client_id": "bad-other"}
    r = _post(ensam_server, params)  # no upload
    assert r.status_code == 400 and "multipart file 'label'" in r.json()["detail"]
    r = _post(ensam_server, {**params, "label": "/etc/hostname"})  # a server path instead of an upload
    assert r.status_code == 400 and "uploaded file" in r.json()["detail"]
    r = _post(ensam_server, params, b"not an image at all" * 10)
    assert r.status_code == 400 and "not a readable image" in r.json()["detail"]
    with open(_save_like_slicer(labelmap, aff, str(tmp_path / "tmpli.nii.gz")), "rb") as f:
        r = _post(ensam_server, {**params, "label_info": [{"name": "foreground_scribbles", "id": "x"}]}, f.read())
    assert r.status_code == 422 and "label_info" in r.json()["detail"]
    # a labelmap of the right shape on another grid (shifted by 10 mm) is refused
    moved = aff.copy()
    moved[:3, 3] += 10.0
    with open(_save_like_slicer(labelmap, moved, str(tmp_path / "tmpmoved.nii.gz")), "rb") as f:
        r = _post(ensam_server, params, f.read())
    assert r.status_code == 422 and "grid" in r.json()["detail"]
    assert requests.get(f"{ensam_server.url}/info/", timeout=TIMEOUT).status_code == 200
    assert ensam_server.alive()


def test_scribbles_with_a_slicer_roi(ensam_server, tmp_path):
    """The scribbles ROI (``getROIPointsXYZ``: rounded IJK corners, a pair reversed by the RAS -> IJK flip) is the
    box prompt: the answer stays around it."""
    img, lab, aff = ensam_server.images[IMAGE]
    labelmap, fg_m, _ = _strokes(ensam_server, bg=False)
    box = np.argwhere(lab == 1)
    lo, hi = box.min(0) - 1, box.max(0) + 1
    roi = [int(hi[0]), int(lo[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])]  # i pair reversed (flipped axis)
    client = MONAILabelClient(ensam_server.url, tmpdir=str(tmp_path), client_id="slicer-roi")
    path = _save_like_slicer(labelmap, aff, str(tmp_path / "tmproi.nii.gz"))
    out, res = client.infer("ensam_scribbles", IMAGE, _slicer_params(ensam_server, roi=roi), label_in=path)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(out)).transpose(2, 1, 0)
    assert res["prompts"]["boxes"] == 1 and res["strokes"]["background_points"] == 0
    assert mask[fg_m].mean() >= 0.8
    grown = np.zeros(mask.shape, bool)  # the ROI plus a few voxels: the engine's margin, resampling
    grown[max(lo[0] - 3, 0):hi[0] + 4, max(lo[1] - 3, 0):hi[1] + 4, max(lo[2] - 3, 0):hi[2] + 4] = True
    assert mask[~grown].sum() == 0
