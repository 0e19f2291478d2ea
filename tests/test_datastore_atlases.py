"""``ensam_seg`` with the datastore's labels as atlases (issue 29, item 2), on real hippocampus MR crops of the
TUNING subjects (``lib.cohorts.subjects("tune")``; never the loop subjects):

* small images get a working grid of their own size (a 5 mm grid leaves a 40 mm crop a few cells wide);
* more atlases segment better (fused atlas DSC, leave-one-out);
* over HTTP: a site's name the token cannot segment is refused before any label is saved, offered by its one
  datastore label once saved (provisional ``atlas`` route), validated leave-one-out once three are saved; bad input
  stays a clear 4xx.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import _copy_app, serve

sitk = pytest.importorskip("SimpleITK")

from lib.atlas.registration import RegistrationConfig, to_sitk, working_grid  # noqa: E402
from lib.cohorts import HIPPOCAMPUS_ROOT, subjects  # noqa: E402
from lib.evaluation.metrics import dice  # noqa: E402

TIMEOUT = 600
pytestmark = pytest.mark.skipif(not (HIPPOCAMPUS_ROOT / "split.json").is_file(),
                                reason="sample-datasets/hippocampus missing")


def test_a_small_image_gets_a_working_grid_of_its_size_a_large_one_keeps_5_mm():
    cfg = RegistrationConfig()
    crop = to_sitk(np.zeros((40, 50, 40), np.float32), np.eye(4))  # a hippocampus crop: 1 mm voxels
    ct = to_sitk(np.zeros((512, 512, 100), np.float32), np.diag([0.8, 0.8, 2.5, 1.0]))
    assert 1.0 <= working_grid(crop, cfg) < 2.0
    assert working_grid(ct, cfg) == cfg.grid_mm
    assert working_grid(crop, RegistrationConfig(min_cells=0)) == cfg.grid_mm


def test_the_local_vote_follows_the_atlas_whose_intensities_match_the_image():
    from lib.atlas.fusion import fuse, fuse_local, local_weights

    target = np.zeros((20, 20, 20), np.float32)
    target[5:15, 5:15, 5:15] = 1.0  # the structure, bright
    good = target.copy()  # an atlas registered well: its image matches, its mask is the structure
    bad = np.roll(target, 4, axis=0)  # one shifted by 4 voxels: image and mask off alike
    masks = [good > 0.5, bad > 0.5, bad > 0.5]
    plain = fuse(masks)  # two bad atlases out-vote the good one
    local = fuse_local(masks, local_weights(target, [good, bad, bad], sigma_vox=1.0, power=3.0))
    truth = target > 0.5
    assert dice(local.mask, truth) > 0.95 > dice(plain.mask, truth)
    assert np.all((local.probability >= 0) & (local.probability <= 1 + 1e-6))


def test_more_datastore_atlases_segment_a_hippocampus_better():
    """Two tuning subjects, each segmented from 1 then 4 of 5 others (the first of the 4 is the 1): fused DSC."""
    from lib.experiments.datastore_atlases import run

    tune = subjects("tune")
    res = run([1, 4], threads=1, engine=False, targets=tune[:2], pool=tune[:6], log=print)
    one, four = res["summary"]["1"]["atlas_dsc"], res["summary"]["4"]["atlas_dsc"]
    print(f"\nfused atlas DSC: 1 atlas {one:.3f}, 4 atlases {four:.3f}")
    assert one > 0.6  # a 5 mm working grid gave 0.04 to 0.28 on such crops
    assert four > one + 0.01


@pytest.fixture(scope="module")
def hippo_server(tmp_path_factory):
    from lib.experiments.datastore_atlases import write_crops

    work = str(tmp_path_factory.mktemp("datastore_atlases"))
    app_dir = _copy_app(os.path.join(work, "app"))
    studies = os.path.join(work, "studies")
    crops = os.path.join(work, "crops")
    os.makedirs(studies)
    os.makedirs(crops)
    names = subjects("tune")[:4]  # three to label, the last one to segment
    got = write_crops(names, crops, 15.0)
    images = {}
    for s in names:
        shutil.copyfile(got[s]["image"], os.path.join(studies, f"{s}.nii.gz"))
        img = nib.load(got[s]["image"])
        images[s] = (np.asarray(img.dataobj), got[s]["reference"], img.affine, got[s]["label"])
    yield from serve(work, app_dir, studies, images, "--conf", "labels", "hippocampus", "--conf", "atlas_threads",
                     "1")


def _seg(server, image, labels="hippocampus"):
    return requests.post(f"{server.url}/infer/ensam_seg", params={"image": image, "output": "all"},
                         data={"params": json.dumps({"labels": labels})}, timeout=TIMEOUT)


def _save(server, image_id):
    from monailabel.client import MONAILabelClient

    label = server.images[image_id][3]
    with tempfile.TemporaryDirectory() as tmp:
        client = MONAILabelClient(server.url, tmpdir=tmp, client_id="annotator")
        res = client.save_label(image_id, label, tag="final",
                                params={"label_info": [{"name": "hippocampus", "idx": 1}]})
    assert res["image"] == image_id


def _routes(server):
    return requests.get(f"{server.url}/info/", timeout=60).json()["models"]["ensam_seg"]


def test_the_datastore_labels_of_a_name_become_its_atlases(hippo_server):
    from test_app_server import _mask_from_multipart

    names = sorted(hippo_server.images)
    target = names[-1]
    ref = hippo_server.images[target][1]
    # before any label: the token alone, below the floor -> refused, saying why
    info = _routes(hippo_server)
    assert "hippocampus" not in info["routes"] and "token" in info["not_offered"]["hippocampus"]
    r = _seg(hippo_server, target)
    assert r.status_code == 422 and "not offered" in r.text and "floor" in r.text, r.text

    # one labelled scan: its label is the atlas (provisional: nothing to leave one out)
    _save(hippo_server, names[0])
    route = _routes(hippo_server)["routes"]["hippocampus"]
    assert route["pool"] == "datastore" and route["atlases"] == 1 and route["validation"] is None, route
    r = _seg(hippo_server, target)
    assert r.status_code == 200, r.text
    mask, _, params = _mask_from_multipart(r)
    s = params["structures"]["hippocampus"]
    assert s["atlases"] == [f"datastore:{names[0]}"] and s["pool"] == "datastore" and "provisional" in s, s
    one = dice(mask == params["label_names"]["hippocampus"], ref)

    # three: validated leave-one-out over the datastore's labels, all three registered
    for n in names[1:3]:
        _save(hippo_server, n)
    r = _seg(hippo_server, target)
    assert r.status_code == 200, r.text
    mask, _, params = _mask_from_multipart(r)
    s = params["structures"]["hippocampus"]
    three = dice(mask == params["label_names"]["hippocampus"], ref)
    print(f"\n{target}: DSC {one:.3f} from 1 datastore atlas, {three:.3f} from 3 ({s['route']}, leave-one-out "
          f"{s['validation']}); {params['latencies']}")
    assert sorted(s["atlases"]) == [f"datastore:{n}" for n in names[:3]], s
    assert s["validation"] is not None and s["validation"] > 0.5 and "provisional" not in s, s
    assert one > 0.6 and three > 0.7, (one, three)
    route = _routes(hippo_server)["routes"]["hippocampus"]
    assert route["atlases"] == 3 and route["validation"] == s["validation"], route


def test_bad_requests_stay_clear_4xx(hippo_server):
    target = sorted(hippo_server.images)[-1]
    r = _seg(hippo_server, target, "no_such_structure")
    assert r.status_code == 422 and "unknown label name" in r.text, r.text
    r = _seg(hippo_server, "no_such_image")
    assert 400 <= r.status_code < 500, r.text
