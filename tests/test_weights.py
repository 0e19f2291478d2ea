"""The model artefact (lib.weights): one .pt with weights + meta, published atomically, read by one reader; the
legacy layout (plain state_dict + side JSON files, releases 1-3) still reads."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lib.contract import Contract, ContractError, read_contract
from lib.engine import EnsamEngine, load_network
from lib.geometry import RoiPolicy
from lib.label_vocab import load_vocab, read_vocab
from lib.network import NetworkConfig, build_network
from lib.training.pretrain import export_weights, init_weights
from lib.weights import FORMAT, WeightsError, load_artefact, read_meta, save_artefact, side_paths

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "apps", "ensam", "model", "pretrained_ensam.pt")
TINY = dict(filters=4, blocks=(1, 1, 1), heads=2, depth=1, roi_size=(16, 16, 16), num_labels=8)


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_network(NetworkConfig(**TINY))


def contract(aspect=3.0):
    return Contract(roi=RoiPolicy(model_shape=(16, 16, 16), max_aspect=aspect))


def same_weights(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_in_one_file_loadable_with_weights_only(tmp_path):
    net = tiny()
    path = str(tmp_path / "w.pt")
    meta = {"network": net.config.to_dict(), "contract": contract().to_dict(), "step": 7,
            "val": np.float32(0.5)}  # numpy scalars are stored as plain values
    save_artefact(path, net.state_dict(), meta, vocabulary={"liver": 4, "spleen": 0})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT and set(raw) == {"format", "state_dict", "meta"}
    art = load_artefact(path)
    assert art.layout == "artefact" and same_weights(art.state_dict, net.state_dict())
    assert art.meta["step"] == 7 and art.vocabulary == {"spleen": 0, "liver": 4}
    assert read_contract(path) == contract() and read_vocab(path) == {"spleen": 0, "liver": 4}
    assert NetworkConfig.from_dict(read_meta(path)["network"]) == net.config
    built = load_network(path)  # config from the artefact's meta
    assert same_weights(built.state_dict(), net.state_dict())
    eng = EnsamEngine(weights=path)
    assert eng.contract == contract() and eng.mtime_ns == os.stat(path).st_mtime_ns
    # the JSON files beside it are copies for people; no temporary file is left behind
    meta_copy, vocab_copy = side_paths(path)
    assert json.load(open(vocab_copy)) == {"spleen": 0, "liver": 4} and json.load(open(meta_copy))["step"] == 7
    assert sorted(os.listdir(tmp_path)) == ["w.json", "w.pt", "w_labels.json"]


def test_meta_inside_the_file_wins_over_the_side_files(tmp_path):
    """Nothing reads the JSON copies when the .pt carries its meta: stale or broken copies change nothing."""
    net = tiny()
    path = str(tmp_path / "w.pt")
    export_weights(net, path, {"network": net.config.to_dict(), "contract": contract(3.0).to_dict()})
    meta_copy, vocab_copy = side_paths(path)
    with open(meta_copy, "w") as f:
        json.dump({"network": dict(TINY, filters=8), "contract": contract(2.0).to_dict()}, f)
    with open(vocab_copy, "w") as f:
        f.write("{ not json")
    assert read_contract(path) == contract(3.0)
    assert read_vocab(path)["liver"] == 4 and load_vocab([path])["liver"] == 4
    assert load_network(path).config.filters == 4
    assert EnsamEngine(weights=path).contract == contract(3.0)


def test_legacy_layout_reads_as_before(tmp_path):
    net = tiny()
    path = str(tmp_path / "old.pt")
    torch.save(net.state_dict(), path)  # releases 1-3: plain state_dict ...
    with open(tmp_path / "old.json", "w") as f:  # ... + <base>.json + <base>_labels.json
        json.dump({"network": net.config.to_dict(), "contract": contract(3.0).to_dict(), "step": 3}, f)
    with open(tmp_path / "old_labels.json", "w") as f:
        json.dump({"spleen": 0, "liver": 4}, f)
    art = load_artefact(path)
    assert art.layout == "legacy" and same_weights(art.state_dict, net.state_dict())
    assert art.meta["step"] == 3 and art.vocabulary == {"spleen": 0, "liver": 4}
    assert read_contract(path) == contract(3.0) and EnsamEngine(weights=path).contract == contract(3.0)
    # a vocabulary given as a "labels" list inside <base>.json (the oldest files)
    os.remove(tmp_path / "old_labels.json")
    with open(tmp_path / "old.json", "w") as f:
        json.dump({"network": net.config.to_dict(), "labels": ["spleen", "kidney_right"]}, f)
    assert read_vocab(path) == {"spleen": 0, "kidney_right": 1}  # the cache saw the side files change
    # fine-tuning / pre-training start from either layout
    other = tiny(seed=5)
    init_weights(other, path)
    assert same_weights(other.state_dict(), net.state_dict())


@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="shipped weights missing")
def test_shipped_weights_are_one_artefact_with_the_legacy_inference_contract():
    """Release 4 on: one artefact; its contract is the one releases 1-3 were read with (the ROI aspect 4 etc.), so
    the engine treats the releases alike."""
    from lib.contract import legacy_contract

    art = load_artefact(SHIPPED)
    assert art.layout == "artefact" and art.network["filters"] == 16 and art.vocabulary["liver"] == 4
    assert read_contract(SHIPPED) == legacy_contract(NetworkConfig.from_dict(art.network))
    assert load_vocab([SHIPPED, SHIPPED + ".missing"])["liver"] == 4


def test_unusable_files_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "w.pt"
    save_artefact(str(path), tiny().state_dict(), {"network": tiny().config.to_dict()})
    good = path.read_bytes()
    for name, data in [("empty.pt", b""), ("text.pt", b"not a checkpoint"), ("cut.pt", good[: len(good) // 2])]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError, match=name):
            load_artefact(str(tmp_path / name))
    torch.save({"format": "ensam-weights/2", "state_dict": {}, "meta": {}}, tmp_path / "newer.pt")
    with pytest.raises(WeightsError, match="newer ensam"):
        load_artefact(str(tmp_path / "newer.pt"))
    torch.save({"format": FORMAT, "state_dict": {"a": 1}, "meta": {}}, tmp_path / "odd.pt")
    with pytest.raises(WeightsError, match="state_dict"):
        load_artefact(str(tmp_path / "odd.pt"))
    torch.save({"format": FORMAT, "state_dict": {}, "meta": {"contract": {"roi": {"model_shape": [8, 8, 8]}},
                                                               "network": TINY}}, tmp_path / "badc.pt")
    with pytest.raises(ContractError, match="badc.pt.*model grid"):
        read_contract(str(tmp_path / "badc.pt"))
    assert read_meta(str(tmp_path / "absent.pt")) == {}


def test_a_crash_while_publishing_leaves_the_old_artefact(tmp_path, monkeypatch):
    """In-process crashes at each point of the publication: before the rename, the old file is untouched; after
    it (copies not yet written), the new file is whole and its own meta is what every reader sees."""
    import lib.weights as W

    path = str(tmp_path / "w.pt")
    old, new = tiny(seed=1), tiny(seed=2)
    save_artefact(path, old.state_dict(), {"network": old.config.to_dict(), "v": "old"}, vocabulary={"liver": 4})

    def boom(*a, **k):
        raise OSError("simulated crash")

    for target in ("replace", "fsync"):  # crash before the rename: while writing/flushing, or at the rename
        with monkeypatch.context() as m:
            m.setattr(W.os, target, boom)
            with pytest.raises(OSError, match="simulated"):
                save_artefact(path, new.state_dict(), {"network": new.config.to_dict(), "v": "new"})
        art = load_artefact(path)
        assert art.meta["v"] == "old" and same_weights(art.state_dict, old.state_dict())
        assert sorted(os.listdir(tmp_path)) == ["w.json", "w.pt", "w_labels.json"]  # no temp left

    with monkeypatch.context() as m:  # crash between the .pt and its JSON copies
        m.setattr(W, "_atomic_json", boom)
        with pytest.raises(OSError, match="simulated"):
            save_artefact(path, new.state_dict(), {"network": new.config.to_dict(), "v": "new"},
                          vocabulary={"liver": 4, "new_name": 5})
    assert json.load(open(tmp_path / "w.json"))["v"] == "old"  # stale copy ...
    assert read_meta(path)["v"] == "new" and read_vocab(path) == {"liver": 4, "new_name": 5}  # ... never read
    assert same_weights(load_artefact(path).state_dict, new.state_dict())


WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from lib.weights import save_artefact
print("ready", flush=True)
i = 0
while True:
    i += 1
    sd = {"w": torch.full((1 << 20,), float(i))}  # 4 MiB: the kill lands inside a write most of the time
    save_artefact(sys.argv[2], sd, {"i": i}, vocabulary={"n%d" % i: i})
"""


def test_sigkill_during_publication_never_leaves_a_broken_artefact(tmp_path):
    """A writer process publishing in a loop is SIGKILLed at random moments: the artefact always loads, its meta
    matches its weights, and the next writer clears the dead writer's temporary file."""
    path = str(tmp_path / "w.pt")
    save_artefact(path, {"w": torch.zeros(1 << 20)}, {"i": 0}, vocabulary={"n0": 0})
    rng = np.random.default_rng(0)
    app = os.path.join(ROOT, "apps", "ensam")
    seen = set()
    for _ in range(6):
        p = subprocess.Popen([sys.executable, "-c", WRITER, app, path], stdout=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(float(rng.uniform(0.05, 0.6)))
        p.send_signal(signal.SIGKILL)
        p.wait()
        art = load_artefact(path)
        i = art.meta["i"]
        assert torch.all(art.state_dict["w"] == float(i)) and art.vocabulary == {f"n{i}": i}
        seen.add(i)
    save_artefact(path, {"w": torch.ones(4)}, {"i": -1})  # the next publication clears dead writers' temps
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert len(seen) > 1  # the writers did publish between kills
