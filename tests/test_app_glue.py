"""Unit tests of the MONAI Label glue (no server, no trained weights): request parsing, the session store, the
infer tasks' geometry and file output with a stub engine, and the HTTP error mapping of the infer route."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SHAPE, synthetic_volume
from lib.infers.engine_provider import EngineProvider
from lib.infers.ensam_infer import EnsamInteractive
from lib.io.imageio import VolumeCache, load_volume, write_mask
from lib.request_parsing import RequestError, parse_prompts, validate_prompts
from lib.session import SessionRegistry as SessionStore


class StubEngine:
    """Marks a ball of radius 2 around each foreground click, fills boxes, keeps the previous mask, clears
    background clicks: the output depends only on geometry, never on training."""

    def __init__(self):
        self.calls = []
        self.last_info = {"cache_hits": 0}

    def segment(self, image, affine, points=None, point_labels=None, boxes=None, prev_mask=None, image_key=None,
                prompts=None, prev_info=None):
        if prompts is not None:  # checked prompts (lib.geometry.Prompts), as the infer task passes them
            points, point_labels, boxes = prompts.points, prompts.point_labels, prompts.boxes
        self.calls.append(dict(points=points, point_labels=point_labels, boxes=boxes, prev=prev_mask is not None))
        out = np.zeros(image.shape, np.uint8) if prev_mask is None else prev_mask.astype(np.uint8).copy()
        ii, jj, kk = np.meshgrid(*[np.arange(s) for s in image.shape], indexing="ij")
        for p, lab in zip(points if points is not None else [], point_labels if point_labels is not None else []):
            ball = (ii - p[0]) ** 2 + (jj - p[1]) ** 2 + (kk - p[2]) ** 2 <= 4
            out[ball] = 1 if lab == 1 else 0
        for b in boxes or []:
            out[b[0]:b[1] + 1, b[2]:b[3] + 1, b[4]:b[5] + 1] = 1
        return out

    def segment_step(self, *args, **kwargs):  # the step the interactive sessions call: (mask, info)
        return self.segment(*args, **kwargs), dict(self.last_info)

    blob_a_token = blob_b_token = None

    def segment_label(self, image, affine, label_id):
        if label_id == self.blob_a_token:
            return (image > 600.0).astype(np.uint8)
        if label_id == self.blob_b_token:
            return ((image > 250.0) & (image < 650.0)).astype(np.uint8)
        return np.zeros(image.shape, np.uint8)

    def segment_labels(self, image, affine, label_ids, spacing_mm=None):
        return {int(i): self.segment_label(image, affine, i) for i in label_ids}


class StubProvider(EngineProvider):
    def __init__(self, tmp):
        super().__init__([os.path.join(tmp, "pretrained_ensam.pt"), os.path.join(tmp, "ensam.pt")])
        self.engine = StubEngine()

    def get(self, device=None):
        return self.engine


@pytest.fixture()
def study(tmp_path):
    img, lab, aff = synthetic_volume(7)
    path = str(tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(img, aff), path)
    return path, img, lab, aff


def test_parse_prompts_slicer_ohif_boxes():
    pts, labs, boxes = parse_prompts({
        "foreground": [[1, 2, 3]], "background": [[4, 5, 6]], "points": [[7, 8, 9], [1, 1, 1]],
        "point_labels": [0, 1], "roi": [10, 2, 5, 9, 3, 1], "boxes": [[0, 1, 0, 1, 0, 1]],
    })
    assert pts == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]] and labs == [1, 0, 0, 1]
    p = validate_prompts(pts, labs, boxes, SHAPE)
    assert p.boxes[0] == [2, 10, 5, 9, 1, 3]  # pairs sorted
    assert p.summary() == {"foreground": 2, "background": 2, "boxes": 2}
    # Slicer sends empty lists and an empty roi when nothing is placed
    assert parse_prompts({"foreground": [], "background": [], "roi": []}) == ([], [], [])


@pytest.mark.parametrize("bad, status, words", [
    ({"roi": [1, 2, 3]}, 400, "roi"),
    ({"roi": "nonsense"}, 400, "roi"),
    ({"foreground": [[1, 2]]}, 400, "foreground"),
    ({"foreground": [[1, "a", 2]]}, 400, "number"),
    ({"points": [[1, 2, 3]], "point_labels": [1, 0]}, 400, "point_labels"),
    ({"points": [[1, 2, 3]], "point_labels": [2]}, 400, "point_labels"),
])
def test_malformed_prompts(bad, status, words):
    with pytest.raises(RequestError) as e:
        parse_prompts(bad)
    assert e.value.status_code == status and words in str(e.value)


def test_out_of_image_prompts():
    with pytest.raises(RequestError) as e:
        validate_prompts([[48, 0, 0]], [1], [], SHAPE)
    assert e.value.status_code == 422 and "outside the image" in str(e.value) and "0..47" in str(e.value)
    with pytest.raises(RequestError) as e:
        validate_prompts([], [], [[60, 70, 0, 5, 0, 5]], SHAPE)
    assert e.value.status_code == 422
    # a box partly outside is clipped, not refused
    assert validate_prompts([], [], [[-5, 10, 0, 100, 2, 3]], SHAPE).boxes == [[0, 10, 0, 39, 2, 3]]


def test_session_store_bounds_and_undo():
    s = SessionStore(max_sessions=2, max_history=3, max_bytes=10**6)
    k = s.key("c", "img", "liver")
    masks = [np.full((4, 4, 4), i % 2, np.uint8) for i in range(5)]
    for m in masks:
        s.push(k, m)
    assert s.depth(k) == 3 and np.array_equal(s.last(k), masks[-1])
    prev, depth = s.undo(k)
    assert depth == 2 and np.array_equal(prev, masks[-2])
    s.push(s.key("c", "img2", ""), masks[0])
    s.push(s.key("c", "img3", ""), masks[0])
    assert len(s) == 2 and s.depth(k) == 0  # least recently used session evicted
    with pytest.raises(KeyError):
        s.undo(k)


def test_prompt_count_limits():
    from lib.request_parsing import MAX_BOXES, MAX_POINTS

    pts = [[1, 1, 1]] * MAX_POINTS
    assert len(parse_prompts({"foreground": pts})[0]) == MAX_POINTS
    for bad, words in [({"foreground": pts + [[1, 1, 1]]}, f"{MAX_POINTS} points"),
                       ({"background": pts[:1], "points": pts, "point_labels": [1] * MAX_POINTS}, "points"),
                       ({"boxes": [[0, 1, 0, 1, 0, 1]] * (MAX_BOXES + 1)}, f"{MAX_BOXES} boxes"),
                       ({"roi": [0, 1, 0, 1, 0, 1], "boxes": [[0, 1, 0, 1, 0, 1]] * MAX_BOXES}, "boxes")]:
        with pytest.raises(RequestError) as e:
            parse_prompts(bad)
        assert e.value.status_code == 413 and words in str(e.value)


def test_session_store_one_step_at_a_time():
    import threading
    import time

    s = SessionStore()
    k = s.key("c", "img", "x")
    log = []

    def step(n):
        with s.locked(k):
            prev = s.last(k)
            time.sleep(0.02)  # the model runs
            s.push(k, np.full((2, 2, 2), n % 2, np.uint8))
            log.append((n, prev is not None))

    threads = [threading.Thread(target=step, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.depth(k) == 4 and sorted(seen for _, seen in log) == [False, True, True, True]
    assert not s._held  # nothing left behind
    mask, depth = s.peek_undo(k)
    assert depth == 3 and s.depth(k) == 4  # peek changes nothing
    assert s.push(k, np.zeros((2, 2, 2), np.uint8), reset=True) == 1


def test_a_failing_inference_leaves_the_session_alone(study, tmp_path):
    path, *_ = study
    provider = StubProvider(str(tmp_path))
    task = EnsamInteractive(provider, VolumeCache(), SessionStore())
    out, _ = task({"image": path, "foreground": [[3, 3, 3]], "client_id": "a"})
    os.remove(out)
    key = task.sessions.key("a", os.path.realpath(path), "")

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    provider.engine.segment = broken
    with pytest.raises(RuntimeError):
        task({"image": path, "foreground": [[5, 5, 5]], "client_id": "a", "reset_state": True})
    assert task.sessions.depth(key) == 1  # neither reset nor a step


def test_interactive_click_lands_on_the_clicked_voxel(study, tmp_path):
    path, img, _, aff = study
    provider = StubProvider(str(tmp_path))
    task = EnsamInteractive(provider, VolumeCache(), SessionStore())
    v = [30, 9, 17]  # far from symmetric: any axis swap or flip misses it
    out, res = task({"image": path, "foreground": [v], "label": "x", "client_id": "a"})
    result = nib.load(out)
    m = np.asarray(result.dataobj)
    assert m.shape == img.shape and np.allclose(result.affine, aff) and m.dtype == np.uint8
    assert m[tuple(v)] == 1 and m.sum() == 33  # the 33-voxel ball, nothing else
    assert provider.engine.calls[-1]["points"].tolist() == [v]
    assert res["label_names"] == {"x": 1} and res["session"]["step"] == 1

    # previous mask is passed on; background click removes; undo restores; reset starts over
    out2, res2 = task({"image": path, "foreground": [v], "background": [[10, 30, 5]], "label": "x",
                       "client_id": "a"})
    assert provider.engine.calls[-1]["prev"] is True and res2["previous_mask"] is True
    out3, res3 = task({"image": path, "undo": True, "label": "x", "client_id": "a"})
    assert np.array_equal(np.asarray(nib.load(out3).dataobj), m) and res3["session"]["step"] == 1
    task({"image": path, "boxes": [[1, 3, 1, 3, 1, 3]], "label": "x", "client_id": "a", "reset_state": True})
    assert provider.engine.calls[-1]["prev"] is False
    # another client does not see this session
    task({"image": path, "foreground": [v], "label": "x", "client_id": "b"})
    assert provider.engine.calls[-1]["prev"] is False
    for f in (out, out2, out3):
        os.remove(f)


def test_requests_without_label_or_client_stand_alone(study, tmp_path):
    """OHIF sends neither a label nor a client id: no previous mask may leak from one label to another."""
    path, *_ = study
    provider = StubProvider(str(tmp_path))
    task = EnsamInteractive(provider, VolumeCache(), SessionStore())
    for _ in range(2):
        out, res = task({"image": path, "foreground": [[5, 5, 5]]})
        os.remove(out)
        assert provider.engine.calls[-1]["prev"] is False and res["session"]["step"] == 0
    assert len(task.sessions) == 0


def test_interactive_nrrd_for_ohif_keeps_geometry(study, tmp_path):
    path, img, _, aff = study
    task = EnsamInteractive(StubProvider(str(tmp_path)), VolumeCache(), SessionStore())
    v = [5, 33, 20]
    out, _ = task({"image": path, "foreground": [v], "result_extension": ".nrrd", "result_dtype": "uint8",
                   "restore_label_idx": False})
    assert out.endswith(".nrrd")
    seg = sitk.ReadImage(out)
    ref = sitk.ReadImage(path)
    assert seg.GetSize() == ref.GetSize() and seg.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(seg.GetSpacing(), ref.GetSpacing()) and np.allclose(seg.GetOrigin(), ref.GetOrigin())
    assert np.allclose(seg.GetDirection(), ref.GetDirection())
    assert sitk.GetArrayFromImage(seg)[v[2], v[1], v[0]] == 1  # sitk arrays are [k, j, i]
    vol = load_volume(out)
    assert np.allclose(vol.affine, aff) and vol.array[tuple(v)] == 1
    os.remove(out)


def test_interactive_rejects_bad_requests_without_changing_the_session(study, tmp_path):
    path, *_ = study
    provider = StubProvider(str(tmp_path))
    task = EnsamInteractive(provider, VolumeCache(), SessionStore())
    task({"image": path, "foreground": [[3, 3, 3]], "client_id": "a"})
    for req, status in [({"foreground": [[3, 3, 99]]}, 422), ({"roi": [1, 2]}, 400), ({}, 400),
                        ({"foreground": [[3, 3, 3]], "result_extension": ".exe"}, 400)]:
        with pytest.raises(RequestError) as e:
            task({"image": path, "client_id": "a", **req})
        assert e.value.status_code == status
    assert task.sessions.depth(task.sessions.key("a", os.path.realpath(path), "")) == 1
    assert len(provider.engine.calls) == 1
    with pytest.raises(RequestError) as e:
        task({"image": path + ".missing", "foreground": [[1, 1, 1]]})
    assert e.value.status_code == 404


def test_write_mask_checks_shape(study):
    path, *_ = study
    with pytest.raises(ValueError):
        write_mask(np.zeros((2, 2, 2)), load_volume(path))


def test_http_error_mapping():
    from monailabel.interfaces.exception import ImageNotFoundException, MONAILabelError, MONAILabelException

    from lib.geometry import PromptError
    from lib.server import http_error_for

    assert http_error_for(RequestError("x", 422)).status_code == 422
    assert http_error_for(RequestError("x")).status_code == 400
    assert http_error_for(PromptError("outside")).status_code == 422
    assert http_error_for(MONAILabelException(MONAILabelError.INVALID_INPUT, "There is no model 'q'")).status_code \
        == 404
    assert http_error_for(ImageNotFoundException("Image x not found")).status_code == 404
    # a fault of the server is not the client's error, whatever its type
    for fault in (RuntimeError("bug"), ValueError("bad json"), FileNotFoundError("gone"), KeyError("k"),
                  MONAILabelException(MONAILabelError.SERVER_ERROR, "broken")):
        assert http_error_for(fault) is None, fault
    try:
        raise RuntimeError("wrapped") from RequestError("inner", 404)
    except RuntimeError as e:
        assert http_error_for(e) is None  # only the error itself counts, not what it was raised from


# ---------------------------------------------------------------------------------------------------- train glue
def test_train_request_and_label_names():
    from lib.trainers.ensam_train import EnsamTrain
    from lib.training.datastore_cases import label_names_of, split_items
    from lib.training.finetune_job import training_devices

    slicer_info = {"label_info": [{"name": "liver", "idx": 1}, {"name": "background", "idx": 0},
                                  {"name": "Spleen", "idx": 3}], "model": "ensam"}
    assert label_names_of(slicer_info, {}) == {"liver": 1, "Spleen": 3}
    assert label_names_of({}, {5: "liver"}) == {"liver": 5}  # no info: values are token id + 1
    items = [{"id": f"i{n}"} for n in range(10)]
    tr, va = split_items(items, 0.2, seed=0)
    assert len(va) == 2 and not {d["id"] for d in tr} & {d["id"] for d in va}
    assert (tr, va) == split_items(list(reversed(items)), 0.2, seed=0)  # deterministic
    assert split_items(items[:1], 0.5) == (items[:1], [])
    task = EnsamTrain("/tmp/none", ["/tmp/none/pretrained_ensam.pt", "/tmp/none/ensam.pt"])
    req = task.parse_request({"max_seconds": "30", "labels": "liver, spleen", "optimizer": ["adamw"],
                              "device": ["cpu"]})
    assert req["max_seconds"] == 30.0 and req["labels"] == ["liver", "spleen"] and req["optimizer"] == "adamw"
    for bad in ({"val_split": 1.5}, {"max_seconds": "x"}, {"optimizer": "sgd"}, {"max_seconds": 0},
                {"rehearsal": 1.0}, {"rehearsal": -0.1}, {"anchor": 1.0}, {"cpu_processes": 0}, {"cpu_processes": "two"},
                {"cpu_processes": (os.cpu_count() or 1) + 1}):
        with pytest.raises(ValueError):
            task.parse_request(bad)
    assert "tracking" not in task.config()
    # one process on the chosen device unless several are asked for
    assert training_devices(task.parse_request({"device": "cpu"})) == ["cpu"]
    assert training_devices(task.parse_request({"device": "cpu", "cpu_processes": 1, "multi_gpu": True})) == ["cpu"]
    if (os.cpu_count() or 1) >= 2:
        assert training_devices(task.parse_request({"device": "cpu", "cpu_processes": 2})) == ["cpu", "cpu"]


def test_boolean_values_are_strict_in_train_infer_and_config():
    """One rule for booleans: a typo is a 400 naming the field in a train request as in an infer request."""
    from lib.request_parsing import parse_bool
    from lib.trainers.ensam_train import EnsamTrain

    task = EnsamTrain("/tmp/none", ["/tmp/none/pretrained_ensam.pt", "/tmp/none/ensam.pt"])
    for key in ("concept", "pretrained", "multi_gpu"):
        with pytest.raises(RequestError, match=key) as e:
            task.parse_request({"device": "cpu", key: "flase"})
        assert e.value.status_code == 400
    req = task.parse_request({"device": "cpu", "concept": "False", "pretrained": ["no"], "multi_gpu": "1"})
    assert (req["concept"], req["pretrained"], req["multi_gpu"]) == (False, False, True)
    req = task.parse_request({"device": "cpu"})
    assert (req["concept"], req["pretrained"], req["multi_gpu"]) == (True, True, False)
    with pytest.raises(RequestError, match="reset_state"):
        parse_bool("flase", "reset_state")
    assert parse_bool(None, "x", default=True) and not parse_bool("OFF", "x") and parse_bool(1, "x")


def test_train_cases_use_one_value_per_name(tmp_path):
    from lib.training.datastore_cases import load_cases

    img, lab, aff = synthetic_volume(3)
    nib.save(nib.Nifti1Image(img, aff), str(tmp_path / "i.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), str(tmp_path / "l.nii.gz"))
    vocab = {"blob_a": 120, "blob_b": 121}
    item = {"id": "i", "image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz"),
            "labels": {"blob_b": 1, "blob_a": 2}}  # saved in the other order by some client
    (case,) = load_cases([item], vocab)
    assert set(np.unique(case["label"])) == {0, 121, 122}
    assert np.array_equal(case["label"] == 122, lab == 1) and np.allclose(case["affine"], aff)


# ---------------------------------------------------------------------------------------------------- batch, AL
def test_manifest_forms():
    from lib.batch.sources import load_manifest

    m = load_manifest({"a": {"roi": [1, 2, 3, 4, 5, 6]}, "b": [{"label": "x", "foreground": [[1, 2, 3]]}, {}]})
    assert list(m) == ["a", "b"] and len(m["b"]) == 2
    assert load_manifest('[{"image": "a", "boxes": [[1, 2, 3, 4, 5, 6]]}]') == {"a": [{"boxes": [[1, 2, 3, 4, 5, 6]]}]}
    with pytest.raises(RequestError):
        load_manifest({"a": {"rio": [1, 2, 3, 4, 5, 6]}})  # a typo is refused, not ignored
    with pytest.raises(RequestError) as e:  # prompts are checked when the manifest is loaded, limits included
        load_manifest({"a": {"roi": [1, 2, 3]}})
    assert "manifest['a'][0]" in str(e.value)
    with pytest.raises(RequestError) as e:
        load_manifest([{"image": "a", "foreground": [[1, 2, 3]]}] * 33)
    assert e.value.status_code == 413 and "32 objects" in str(e.value)
    with pytest.raises(RequestError):
        load_manifest('{"a": ')  # not JSON: a request error, not a server fault
    assert load_manifest(None) is None


def test_batch_with_the_interactive_model_needs_a_manifest(tmp_path):
    from lib.infers.batch import EnsamBatchInfer

    task = EnsamInteractive(StubProvider(str(tmp_path)), VolumeCache(), SessionStore())
    with pytest.raises(RequestError) as e:
        EnsamBatchInfer({"ensam": task})({"model": "ensam"}, datastore=None, infer=None)
    assert "manifest" in str(e.value)


def test_novelty_is_distance_to_nearest_labelled_or_pending():
    from lib.activelearning.scoring import novelty_scores

    e = {"lab": np.array([1.0, 0.0]), "near": np.array([0.9, 0.1]), "far": np.array([0.0, 1.0]),
         "far2": np.array([0.1, 0.9])}
    s = novelty_scores(e, {"lab"})
    assert s["far"] > s["far2"] > s["near"]
    s2 = novelty_scores(e, {"lab"}, pending={"far"})  # "far" is being labelled: "far2" is no longer novel
    assert s2["far2"] < s["far2"]
    assert set(novelty_scores(e, set())) == set(e)  # nothing labelled: distance to the mean


def test_flip_disagreement():
    from lib.activelearning.features import disagreement, flip_predictions

    img, _, aff = synthetic_volume(1)
    eng = StubEngine()
    eng.blob_a_token = 0
    masks = flip_predictions(eng, img, aff, [0, 5])
    assert set(masks) == {0, 5} and not any(m.any() for m in masks[5])
    masks = masks[0]
    assert len(masks) == 4 and masks[0].any() and all(m.shape == img.shape for m in masks)
    assert disagreement(masks) == 0.0  # a flip-equivariant predictor agrees with itself
    assert disagreement([masks[0], ~masks[0]]) == 1.0
    assert disagreement([np.zeros((2, 2, 2), bool)] * 4) == 1.0  # found nothing: not "confident"


def test_monailabel_patches_name_the_version_they_were_written_for(caplog):
    import monailabel

    from lib import monailabel_patches as mp

    assert mp.WRITTEN_FOR == "0.8.5" and mp.check_version(mp.WRITTEN_FOR)
    assert mp.check_version() == (monailabel.__version__ == mp.WRITTEN_FOR)
    caplog.clear()
    with caplog.at_level("WARNING", logger="ensam.monailabel_patches"):
        assert not mp.check_version("0.9.0")
    assert "0.8.5" in caplog.text and "0.9.0" in caplog.text and "monailabel_patches" in caplog.text


def test_boundary_cut_conf_setting():
    """``--conf boundary_cut true/false`` (and ``lone_click_view``) set the engine's stage; absent, the engine's
    default stands; a typo is refused naming the setting."""
    from lib.click_scale import LoneClickView
    from lib.configs.ensam import EnsamConfig
    from lib.engine import EngineConfig
    from lib.graphcut import BoundaryCut

    assert EnsamConfig._engine_kwargs({}) == {}
    assert isinstance(EnsamConfig._engine_kwargs({"boundary_cut": "true"})["config"].boundary_cut, BoundaryCut)
    assert EnsamConfig._engine_kwargs({"boundary_cut": "false"})["config"].boundary_cut is None
    with pytest.raises(RequestError, match="boundary_cut"):
        EnsamConfig._engine_kwargs({"boundary_cut": "ture"})
    only_view = EnsamConfig._engine_kwargs({"lone_click_view": "false"})["config"]
    assert only_view.lone_click_view is None
    assert (only_view.boundary_cut is None) == (EngineConfig().boundary_cut is None)  # the other stays default
    both = EnsamConfig._engine_kwargs({"lone_click_view": "true", "boundary_cut": "false"})["config"]
    assert isinstance(both.lone_click_view, LoneClickView) and both.boundary_cut is None
    with pytest.raises(RequestError, match="lone_click_view"):
        EnsamConfig._engine_kwargs({"lone_click_view": "maybe"})
    assert EngineConfig().correction_reach[2:] == ("guard", 0.15)  # guarded by default (issue 27)
    off = EnsamConfig._engine_kwargs({"conservative_corrections": "false"})["config"]
    assert off.correction_reach == () and off.lone_correction_reach == ()
    on = EnsamConfig._engine_kwargs({"conservative_corrections": "true"})["config"]
    assert on.correction_reach == on.lone_correction_reach == (3.0, 3.0, "asym") and (on.boundary_cut is None) == (EngineConfig().boundary_cut is None)
    with pytest.raises(RequestError, match="conservative_corrections"):
        EnsamConfig._engine_kwargs({"conservative_corrections": "yes please"})
    assert EnsamConfig._engine_kwargs({"bf16": "off"})["config"].bf16 == "off"
    assert EnsamConfig._engine_kwargs({"bf16": "auto"}) == {} and EngineConfig().bf16 == "auto"
    with pytest.raises(RequestError, match="bf16"):
        EnsamConfig._engine_kwargs({"bf16": "fast"})
