"""Issue 28: :class:`lib.session.InteractiveSession` owns one (client, image, label)'s state: each step returns its
own info with its mask (per object for several boxes), the history gives undo, a failed step changes nothing, and the
registry hands every request of a key the same session, one at a time."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lib.geometry import check_prompts
from lib.io.volumes import Volume
from lib.session import InteractiveSession, SessionRegistry
from test_click_path import _engine, volume as arrays  # noqa: F401 (the click path's test volume: a fixture)

B1, B2 = [2, 10, 2, 10, 2, 8], [50, 65, 40, 55, 15, 25]


@pytest.fixture(scope="module")
def engine():
    return _engine()


@pytest.fixture(scope="module")
def volume(arrays):
    return Volume(*arrays, "vol.nii.gz", None, "vol-key")


def _prompts(vol, boxes=None, points=None, labels=None):
    return check_prompts(points, labels, boxes, vol.shape)


def test_each_answer_carries_its_own_info_per_object(engine, volume):
    reg = SessionRegistry()
    with reg.locked(reg.key("c", "vol", "one")) as s1:
        m1, info1 = s1.add_prompts(engine, volume, _prompts(volume, [B1]))
    with reg.locked(reg.key("c", "vol", "two")) as s2:
        m2, info2 = s2.add_prompts(engine, volume, _prompts(volume, [B2]))
    with reg.locked(reg.key("c", "vol", "both")) as s3:
        both, info3 = s3.add_prompts(engine, volume, _prompts(volume, [B1, B2]))
    assert np.array_equal(both, m1 | m2)
    # every box's ROI, in the request's order, each equal to what that box alone reported
    assert [o["roi_start"] for o in info3["objects"]] == [info1["roi_start"], info2["roi_start"]]
    assert [o["roi_size"] for o in info3["objects"]] == [info1["roi_size"], info2["roi_size"]]
    assert info3["cache_hits"] == sum(o["cache_hits"] for o in info3["objects"])
    # the info belongs to the session that asked: a later step of another session does not change it
    assert s1.last_info is info1 and s2.last_info is info2 and s1.last_info["roi_start"] != info2["roi_start"]
    assert info1["previous_mask"] is False and s1.image_key == "vol-key" and s1.volume is volume


def test_concurrent_sessions_on_one_engine_keep_their_info(engine, volume):
    """Two sessions' steps interleaved on one engine (no device lock): each gets the info of its own step."""
    alone = {}
    for name, box in (("a", B1), ("b", B2)):
        _, info = SessionRegistry.transient().add_prompts(engine, volume, _prompts(volume, [box]))
        alone[name] = info["roi_start"]
    got, errors = {}, []

    def run(name, box):
        try:
            for _ in range(3):
                _, info = SessionRegistry.transient().add_prompts(engine, volume, _prompts(volume, [box]))
                got.setdefault(name, []).append(info["roi_start"])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=a) for a in (("a", B1), ("b", B2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == {"a": [alone["a"]] * 3, "b": [alone["b"]] * 3}


def test_history_undo_and_a_failed_step(engine, volume):
    reg = SessionRegistry(max_history=3)
    key = reg.key("c", "vol", "x")
    with reg.locked(key) as s:
        first, _ = s.add_prompts(engine, volume, _prompts(volume, [B1]))
        second, info = s.add_prompts(engine, volume, _prompts(volume, [B1], [[5, 5, 5]], [1]))
        assert info["previous_mask"] is True and s.depth == 2

        def broken(mask):
            raise OSError("disk full")

        with pytest.raises(OSError):  # the answer could not be written: nothing recorded, nothing reset
            s.add_prompts(engine, volume, _prompts(volume, [B2]), reset=True, before_record=broken)
        assert s.depth == 2 and np.array_equal(s.previous(), second.astype(bool))
        back, depth = s.undo()
        assert depth == 1 and np.array_equal(back, first.astype(bool))
    assert reg.depth(key) == 1
    # a transient session (no session memory) remembers nothing
    t = SessionRegistry.transient(key)
    t.add_prompts(engine, volume, _prompts(volume, [B2]))
    assert t.depth == 0 and reg.depth(key) == 1


def test_one_session_object_per_key_while_requests_are_in_flight():
    reg = SessionRegistry(max_sessions=1)
    key, other = reg.key("c", "img", "x"), reg.key("c", "img2", "x")
    order, seen = [], []

    def step(n):
        with reg.locked(key) as s:
            seen.append(s)
            prev = s.previous()
            time.sleep(0.02)
            reg.push(other, np.ones((2, 2, 2), np.uint8))  # another session evicts this one meanwhile
            s.record(np.full((2, 2, 2), n % 2, np.uint8))
            order.append(prev is not None)

    threads = [threading.Thread(target=step, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s is seen[0] for s in seen) and sorted(order) == [False, True, True]
    assert reg.depth(key) == 3 and not reg._held and len(reg) == 1
    assert isinstance(seen[0], InteractiveSession)
