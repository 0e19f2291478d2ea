"""The click path (issue 11): one prompt rule, ROI reuse that gives the answer a fresh engine gives, clicks with
several boxes, the session store bounded in bytes, and the concept-mode (label-name, prompt-free) contract. Engine
tests use a tiny random network; the HTTP tests a real server (``ensam_server``) and its shipped weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import requests
import torch

from conftest import BLOBS
from lib.engine import EngineConfig, EnsamEngine
from lib.geometry import PromptError, check_prompts, voxel_index
from lib.request_parsing import RequestError, validate_prompts
from lib.session import SessionRegistry as SessionStore
from lib.network import NetworkConfig, build_network

torch.set_num_threads(1)
CFG = NetworkConfig(filters=4, blocks=(1, 1, 1), heads=2, depth=1, roi_size=(24, 24, 24), num_labels=8)
TIMEOUT = 120


def _engine():
    torch.manual_seed(0)
    return EnsamEngine(network=build_network(CFG), config=EngineConfig(max_zoom=0))


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 20, (70, 60, 30)).astype(np.int16)
    img[20:40, 20:45, 10:20] += 300
    img[50:62, 8:20, 4:12] += 250
    return img, np.diag([0.9, 0.9, 2.5, 1.0])


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


# ------------------------------------------------------------------------------------------- one prompt rule
def test_one_rounding_rule_for_points_and_boxes_over_http_and_the_engine(volume):
    img, aff = volume
    assert voxel_index([2.5, 0.49, -0.5, 3.5]).tolist() == [3, 0, 0, 4]  # halves up, for every coordinate
    p = check_prompts([[30.5, 30.2, 14.5]], [1], [[20.5, 39.4, 44.6, 20.5, 10.5, 19.5]], img.shape)
    assert p.points.tolist() == [[31, 30, 15]] and p.boxes == [[21, 39, 21, 45, 11, 20]]
    # the infer task's check is the same function (errors become 4xx)
    q = validate_prompts([[30.5, 30.2, 14.5]], [1], [[20.5, 39.4, 44.6, 20.5, 10.5, 19.5]], img.shape)
    assert np.array_equal(q.points, p.points) and q.boxes == p.boxes
    with pytest.raises(RequestError) as e:
        validate_prompts([[69.5, 0, 0]], [1], [], img.shape)  # rounds to 70: outside a 70-voxel axis
    assert e.value.status_code == 422 and "outside the image" in str(e.value)
    with pytest.raises(PromptError, match="outside the image"):
        _engine().segment(img, aff, points=[[69.5, 0, 0]], point_labels=[1])
    # through the engine's Python API, unrounded prompts give the answer of the rounded ones
    eng = _engine()
    a = eng.segment(img, aff, points=[[30.5, 30.2, 14.5]], point_labels=[1],
                    boxes=[[20.5, 39.4, 44.6, 20.5, 10.5, 19.5]])
    b = eng.segment(img, aff, points=[[31, 30, 15]], point_labels=[1], boxes=[[21, 39, 21, 45, 11, 20]])
    c = eng.segment(img, aff, prompts=p)
    assert np.array_equal(a, b) and np.array_equal(a, c)


# ------------------------------------------------------------------------------------------------ ROI reuse
def test_roi_reuse_gives_the_answer_of_a_fresh_engine(volume, monkeypatch):
    """A refinement click that reuses its session's cached encoding answers exactly what a fresh engine (empty
    cache) answers when it encodes the same ROI itself."""
    img, aff = volume
    box = [[20, 39, 20, 44, 10, 19]]
    clicks = dict(points=[[30, 30, 15], [22, 42, 11]], point_labels=[1, 0])
    cached = _engine()
    m1, first = cached.segment_step(img, aff, boxes=box, image_key="v")
    m2 = cached.segment(img, aff, boxes=box, prev_mask=m1, image_key="v", prev_info=first, **clicks)
    info = dict(cached.last_info)
    assert info["cache_hits"] >= 1
    assert (info["roi_start"], info["roi_size"]) == (first["roi_start"], first["roi_size"])  # the session's own
    roi, = cached.step_rois(info, cached.contract.roi.model_shape)

    fresh = _engine()
    monkeypatch.setattr(fresh, "_pick_roi", lambda *a, **k: roi)  # the ROI the cached answer used
    f2 = fresh.segment(img, aff, boxes=box, prev_mask=m1, image_key="v", **clicks)
    assert fresh.last_info["cache_hits"] == 0 and fresh.cache.misses >= 1
    assert np.array_equal(m2, f2)
    # a reused encoding belongs to its image and its weights only
    other = img.copy()
    other[:5] += 1
    cached.segment(other, aff, boxes=box, prev_mask=m1, image_key="w", prev_info=first, **clicks)
    assert cached.last_info["cache_hits"] == 0


def test_a_correction_does_not_depend_on_other_sessions_rois(volume):
    """A corrective step reuses only its own session's previous ROI: another session's request on the same image
    in between (a slightly larger box, whose ROI contains this session's prompts and is newer in the cache) changes
    nothing, and without the previous step's info the step gets a fresh ROI."""
    img, aff = volume
    mine, theirs = [[20, 39, 20, 44, 10, 19]], [[18, 41, 18, 46, 8, 21]]
    clicks = dict(points=[[30, 30, 15], [22, 42, 11]], point_labels=[1, 0])
    alone = _engine()
    m1, i1 = alone.segment_step(img, aff, boxes=mine, image_key="v")
    a2, _ = alone.segment_step(img, aff, boxes=mine, prev_mask=m1, image_key="v", prev_info=i1, **clicks)

    shared = _engine()
    s1, j1 = shared.segment_step(img, aff, boxes=mine, image_key="v")
    _, other = shared.segment_step(img, aff, boxes=theirs, image_key="v")  # another client, the same image
    assert other["roi_start"] != j1["roi_start"] or other["roi_size"] != j1["roi_size"]
    s2, s_info = shared.segment_step(img, aff, boxes=mine, prev_mask=s1, image_key="v", prev_info=j1, **clicks)
    assert np.array_equal(m1, s1) and np.array_equal(a2, s2)
    assert (s_info["roi_start"], s_info["roi_size"]) == (j1["roi_start"], j1["roi_size"]) and s_info["cache_hits"]
    # no previous info: the ROI is chosen from the prompts and the previous mask alone, whatever the cache holds
    _, n_info = shared.segment_step(img, aff, boxes=mine, prev_mask=s1, image_key="v", **clicks)
    _, f_info = _engine().segment_step(img, aff, boxes=mine, prev_mask=s1, image_key="v", **clicks)
    assert (n_info["roi_start"], n_info["roi_size"]) == (f_info["roi_start"], f_info["roi_size"])


# ------------------------------------------------------------------------------------- clicks + several boxes
def test_clicks_with_several_boxes_are_each_boxs_own_object(volume):
    """Several boxes with clicks: each box is segmented with the clicks inside it (a click in no box is ignored),
    the answers are united; the previous mask is replaced inside the predicted regions, kept outside."""
    img, aff = volume
    b1, b2 = [20, 39, 20, 44, 10, 19], [50, 61, 8, 19, 4, 11]
    pts, labs = [[30, 30, 15], [55, 14, 8], [56, 10, 5], [5, 55, 25]], [1, 1, 0, 1]
    eng = _engine()
    both = eng.segment(img, aff, boxes=[b1, b2], points=pts, point_labels=labs)
    one = eng.segment(img, aff, boxes=[b1], points=pts[:1], point_labels=labs[:1])
    two = eng.segment(img, aff, boxes=[b2], points=pts[1:3], point_labels=labs[1:3])
    assert np.array_equal(both, one | two)

    prev = np.zeros(img.shape, np.uint8)
    prev[0:4, 0:4, 0:4] = 1  # far from both boxes: kept
    prev[25:35, 25:35, 12:18] = 1  # inside box 1: its region is predicted again
    again = eng.segment(img, aff, boxes=[b1, b2], points=pts, point_labels=labs, prev_mask=prev)
    assert again[0:4, 0:4, 0:4].all() and again.dtype == np.uint8 and set(np.unique(again)) <= {0, 1}


# ------------------------------------------------------------------------------------ sessions bounded in bytes
def test_sessions_are_evicted_by_memory():
    shape = (64, 64, 32)  # 16 KiB per bit-packed mask
    one = shape[0] * shape[1] * shape[2] // 8
    store = SessionStore(max_sessions=100, max_history=10, max_bytes=5 * one)
    rng = np.random.default_rng(0)
    masks = {}
    for n in range(4):
        key = store.key("c", f"img{n}", "liver")
        for step in range(2):
            masks[key, step] = (rng.random(shape) > 0.5).astype(np.uint8)
            store.push(key, masks[key, step])
        assert store.nbytes <= 5 * one
    # 4 sessions x 2 steps = 8 masks for a budget of 5: the least recently used sessions went first
    keys = [store.key("c", f"img{n}", "liver") for n in range(4)]
    assert store.depth(keys[0]) == 0 and store.depth(keys[1]) == 0
    assert store.depth(keys[2]) == 2 and store.depth(keys[3]) == 2 and store.nbytes == 4 * one
    last = store.last(keys[3], shape)
    assert last.dtype == bool and np.array_equal(last, masks[keys[3], 1])  # one representation: bool out
    # reading a session makes it recent: it survives the next eviction
    store.last(keys[2])
    store.push(store.key("c", "img4", "liver"), masks[keys[3], 0])
    store.push(store.key("c", "img4", "liver"), masks[keys[3], 1])
    assert store.depth(keys[2]) == 2 and store.depth(keys[3]) == 0
    # a single session larger than the budget keeps only its newest steps
    big = SessionStore(max_bytes=2 * one)
    k = big.key("c", "img", "x")
    for step in range(4):
        big.push(k, masks[keys[3], step % 2])
    assert big.depth(k) == 2 and big.nbytes == 2 * one


def test_one_mask_representation_through_the_session_store(volume):
    """The engine's answer (uint8 0/1, Fortran order) goes into the store and comes back as a bool array of the same
    order and values, which the engine takes as its previous mask and answers the same as with the uint8 one."""
    img, aff = volume
    eng = _engine()
    m = eng.segment(img, aff, boxes=[[20, 39, 20, 44, 10, 19]])
    assert m.dtype == np.uint8 and m.flags.f_contiguous and m.any()
    store = SessionStore()
    k = store.key("c", "img", "x")
    store.push(k, m)
    back = store.last(k, img.shape)
    assert back.dtype == bool and back.flags.f_contiguous and np.array_equal(back, m)
    click = dict(boxes=[[20, 39, 20, 44, 10, 19]], points=[[30, 30, 15]], point_labels=[1])
    assert np.array_equal(eng.segment(img, aff, prev_mask=back, **click), eng.segment(img, aff, prev_mask=m, **click))
    c_order = np.ascontiguousarray(m)
    store.push(k, c_order)
    assert store.last(k).flags.c_contiguous and np.array_equal(store.last(k), m)


# --------------------------------------------------------------------------------------------------- HTTP
def _infer(server, model, image, params, output="all"):
    return requests.post(f"{server.url}/infer/{model}", params={"image": image, "output": output},
                         data={"params": json.dumps(params)}, timeout=TIMEOUT)


def _answer(resp):
    """(mask, params) of an ``output=all`` answer."""
    from test_app_server import _mask_from_multipart

    mask, _, params = _mask_from_multipart(resp)
    return mask, params


def _server_engine(server, params):
    """A local engine with the weights the server's answer names (training tests may have published new ones)."""
    if not params.get("weights"):
        pytest.skip("the server has no weights")
    return EnsamEngine(weights=os.path.join(server.app_dir, "model", params["weights"]))


def test_http_clicks_with_several_boxes_and_the_time_split(ensam_server):
    img, _, aff = ensam_server.images["vol1"]
    boxes = [[9, 25, 3, 17, 4, 14], [30, 44, 17, 33, 11, 21]]  # around blob_a and blob_b (vol1 is shifted)
    p = {"boxes": boxes, "foreground": [[17, 10, 9]], "background": [[31, 18, 12], [2, 2, 2]], "label": "two",
         "client_id": "boxes-clicks", "reset_state": True}
    r = _infer(ensam_server, "ensam", "vol1", p)
    assert r.status_code == 200, r.text
    mask, params = _answer(r)
    assert params["prompts"] == {"foreground": 1, "background": 2, "boxes": 2}
    lat = params["latencies"]
    assert {"load", "prompt", "encode", "decode", "paste", "cut", "write", "total"} <= set(lat)
    assert lat["cut"] > 0  # the boundary cut runs on every answer and its time is reported
    assert lat["total"] >= lat["infer"] >= lat["encode"] > 0 and lat["write"] > 0
    # the server's answer is the engine's (the same prompts through the Python API, another process: float
    # reductions may flip a boundary voxel)
    local = _server_engine(ensam_server, params).segment(img, aff, boxes=boxes,
                                                         points=[[17, 10, 9], [31, 18, 12], [2, 2, 2]],
                                                         point_labels=[1, 0, 0])
    assert mask.shape == img.shape and _dice(mask, local) >= 0.98 and mask.any()
    # the click outside both boxes belongs to no object: the same answer without it
    r2 = _infer(ensam_server, "ensam", "vol1", dict(p, background=[[31, 18, 12]], client_id="boxes-clicks-2"))
    assert np.array_equal(_answer(r2)[0], mask)


def test_http_refinement_with_roi_reuse_equals_a_fresh_engine(ensam_server, monkeypatch):
    img, _, aff = ensam_server.images["vol2"]
    base = {"roi": [4, 20, 8, 22, 5, 15], "label": "reuse", "client_id": "reuse"}  # blob_a of vol2
    m1, _ = _answer(_infer(ensam_server, "ensam", "vol2", dict(base, reset_state=True)))
    r = _infer(ensam_server, "ensam", "vol2", dict(base, foreground=[[12, 15, 10]], background=[[5, 9, 6]]))
    m2, p2 = _answer(r)
    assert p2["engine"]["cache_hits"] >= 1 and p2["previous_mask"]
    from lib.geometry import Roi

    eng = _server_engine(ensam_server, p2)
    roi = Roi(tuple(p2["engine"]["roi_start"]), tuple(p2["engine"]["roi_size"]), tuple(eng.network.config.roi_size))
    monkeypatch.setattr(eng, "_pick_roi", lambda *a, **k: roi)
    fresh = eng.segment(img, aff, boxes=[base["roi"]], points=[[12, 15, 10], [5, 9, 6]], point_labels=[1, 0],
                        prev_mask=m1)
    assert eng.last_info["cache_hits"] == 0
    assert _dice(m2, fresh) >= 0.98 and np.count_nonzero(m2 != fresh) <= max(20, 0.01 * np.count_nonzero(m2))


def test_http_corrections_do_not_depend_on_another_clients_requests(ensam_server):
    """Two clients on one image: client B's box between client A's first prompt and A's correction changes nothing
    in A's answer (A's correction reuses A's own ROI, never B's newer, larger one that contains A's prompts)."""
    base = {"roi": [4, 20, 8, 22, 5, 15], "label": "own-roi"}  # blob_a of vol2
    click = dict(foreground=[[12, 15, 10]], background=[[5, 9, 6]])
    _infer(ensam_server, "ensam", "vol2", dict(base, client_id="own-alone", reset_state=True))
    alone, p_alone = _answer(_infer(ensam_server, "ensam", "vol2", dict(base, client_id="own-alone", **click)))
    _infer(ensam_server, "ensam", "vol2", dict(base, client_id="own-shared", reset_state=True))
    _infer(ensam_server, "ensam", "vol2", {"roi": [3, 21, 7, 23, 4, 16], "label": "theirs", "client_id": "other",
                                           "reset_state": True})
    shared, p_shared = _answer(_infer(ensam_server, "ensam", "vol2", dict(base, client_id="own-shared", **click)))
    assert p_shared["previous_mask"] and p_shared["engine"]["cache_hits"] >= 1
    assert (p_shared["engine"]["roi_start"], p_shared["engine"]["roi_size"]) == \
        (p_alone["engine"]["roi_start"], p_alone["engine"]["roi_size"])
    assert np.array_equal(alone, shared)


def test_http_concept_mode_contract(ensam_server):
    """``ensam_seg``: label names only, no prompt; the answer's ``label_names`` are the names found, with the ids
    /info lists; the file holds exactly those values; clicks are not part of it (ignored); unknown names are 422."""
    ids = requests.get(f"{ensam_server.url}/info/", timeout=TIMEOUT).json()["models"]["ensam_seg"]["labels"]
    names = list(BLOBS)
    r = _infer(ensam_server, "ensam_seg", "vol0", {"labels": ",".join(names)})
    assert r.status_code == 200, r.text
    seg, params = _answer(r)
    assert params["requested"] == names and set(params["voxels"]) == set(names)
    assert set(params["label_names"]) <= set(names)
    assert all(params["label_names"][n] == ids[n] for n in params["label_names"])
    values = set(np.unique(seg).astype(int).tolist()) - {0}
    assert values == set(params["label_names"].values())
    assert all(int(np.count_nonzero(seg == ids[n])) == params["voxels"][n] for n in names)
    with_clicks = _infer(ensam_server, "ensam_seg", "vol0", {"labels": names, "foreground": [[1, 1, 1]]})
    assert np.array_equal(_answer(with_clicks)[0], seg)
    bad = _infer(ensam_server, "ensam_seg", "vol0", {"labels": "blob_a,no_such_organ"})
    assert bad.status_code == 422 and "no_such_organ" in bad.json()["detail"]
