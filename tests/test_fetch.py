"""scripts/fetch_sample_data.py's one download path (sample_data.pinned.download_pinned) and its writers, on local
files and a local HTTP server: a file reaches its destination only with its pinned sha256, and a refusal leaves
nothing behind. Nothing is downloaded from the internet here."""

import functools
import hashlib
import http.server
import json
import os
import re
import sys
import tarfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import fetch_sample_data as fsd  # noqa: E402
from sample_data import common, pinned  # noqa: E402
from sample_data.extra import EXTRA_DISTS  # noqa: E402

from lib.io.atomic import atomic_write_via  # noqa: E402

PAYLOAD = b"ensam sample archive\n" * 1000
GOOD = hashlib.sha256(PAYLOAD).hexdigest()
BAD = hashlib.sha256(b"something else").hexdigest()


def _default_mode() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return 0o666 & ~old


def _leftovers(folder: Path, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files of a folder, and ``/pkg/``: a PEP 691 JSON simple-API page (``self.server.listing``)."""

    def do_GET(self):
        if self.path == "/pkg/":
            body = json.dumps(self.server.listing).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture()
def served(tmp_path):
    """A local HTTP server over tmp_path/www: (server, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "pkg-1.0.tar.gz").write_bytes(PAYLOAD)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(www)))
    server.listing = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_file_with_its_pinned_sha256_is_published_whole(tmp_path):
    src = tmp_path / "src.tar.gz"
    src.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    dest = pinned.download_pinned(src.as_uri(), cache / "pkg-1.0.tar.gz", GOOD)
    assert dest.read_bytes() == PAYLOAD and pinned.sha256_of(dest) == GOOD
    assert (dest.stat().st_mode & 0o777) == _default_mode()  # not the temporary file's 0o600
    assert _leftovers(cache) == ["pkg-1.0.tar.gz"]


def test_a_wrong_sha256_is_refused_and_leaves_nothing(tmp_path):
    src = tmp_path / "src.tar.gz"
    src.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(common.FetchError, match=f"sha256 {GOOD} != pinned {BAD}"):
        pinned.download_pinned(src.as_uri(), cache / "pkg-1.0.tar.gz", BAD)
    assert _leftovers(cache) == []
    # a file already there stays as it was
    (cache / "pkg-1.0.tar.gz").write_bytes(b"old")
    with pytest.raises(common.FetchError):
        pinned.download_pinned(src.as_uri(), cache / "pkg-1.0.tar.gz", BAD)
    assert _leftovers(cache) == ["pkg-1.0.tar.gz"] and (cache / "pkg-1.0.tar.gz").read_bytes() == b"old"


@pytest.mark.parametrize("sha", ["", None, "abc", GOOD.upper()])
def test_no_valid_pin_no_download(tmp_path, sha):
    src = tmp_path / "src.tar.gz"
    src.write_bytes(PAYLOAD)
    with pytest.raises(common.FetchError, match="no valid pinned sha256"):
        pinned.download_pinned(src.as_uri(), tmp_path / "cache" / "x.tar.gz", sha)
    assert not (tmp_path / "cache").exists()


def test_over_http_the_same_rule(tmp_path, served):
    _, base = served
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(common.FetchError, match="!= pinned"):
        pinned.download_pinned(f"{base}/pkg-1.0.tar.gz", cache / "pkg-1.0.tar.gz", BAD)
    with pytest.raises(common.FetchError, match="could not download"):
        pinned.download_pinned(f"{base}/missing.tar.gz", cache / "pkg-1.0.tar.gz", GOOD)
    assert _leftovers(cache) == []
    pinned.download_pinned(f"{base}/pkg-1.0.tar.gz", cache / "pkg-1.0.tar.gz", GOOD)
    assert (cache / "pkg-1.0.tar.gz").read_bytes() == PAYLOAD


def _listing(listed_sha: str) -> dict:
    return {"files": [{"filename": "pkg-1.0.tar.gz", "url": "../pkg-1.0.tar.gz", "hashes": {"sha256": listed_sha}}]}


def test_fetch_dist_falls_back_to_the_index_and_still_checks_the_pin(tmp_path, served, monkeypatch):
    server, base = served

    def no_pip(dist, cache):
        raise common.FetchError("pip download did not give it (test)")

    monkeypatch.setattr(pinned, "_pip_download", no_pip)
    monkeypatch.setattr(pinned, "pip_index_url", lambda: base)
    cache = tmp_path / "cache"
    server.listing = _listing(GOOD)
    dist = pinned.Dist("pkg", "1.0", "pkg-1.0.tar.gz", GOOD, ())
    assert pinned.fetch_dist(dist, cache).read_bytes() == PAYLOAD
    assert _leftovers(cache) == ["pkg-1.0.tar.gz"]
    # second run: the cached file's digest is checked, nothing is fetched
    monkeypatch.setattr(pinned, "pip_index_url", lambda: pytest.fail("downloaded again"))
    assert pinned.fetch_dist(dist, cache).read_bytes() == PAYLOAD
    # a pin that the index's file does not match: refused, nothing left (the stale file is removed first)
    monkeypatch.setattr(pinned, "pip_index_url", lambda: base)
    wrong = pinned.Dist("pkg", "1.0", "pkg-1.0.tar.gz", BAD, ())
    with pytest.raises(common.FetchError, match="lists sha256"):
        pinned.fetch_dist(wrong, cache)
    server.listing = _listing(BAD)  # the index lists the pinned digest but serves other bytes
    with pytest.raises(common.FetchError, match="!= pinned"):
        pinned.fetch_dist(wrong, cache)
    assert _leftovers(cache) == []


def test_pip_downloads_reach_the_cache_through_the_pinned_download(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):  # "pip download" putting a file with other bytes in its --dest folder
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "pkg-1.0.tar.gz").write_bytes(b"tampered")
        calls.append(cmd)
        return type("P", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(pinned.subprocess, "run", fake_run)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(common.FetchError, match="!= pinned"):
        pinned._pip_download(pinned.Dist("pkg", "1.0", "pkg-1.0.tar.gz", GOOD, ()), cache)
    assert calls and "--no-binary" in calls[0] and _leftovers(cache) == []  # its private folder is gone too


def test_every_source_is_pinned_and_downloaded_in_one_place():
    dists = [fsd.TS_DIST, *EXTRA_DISTS.values()]
    assert all(re.fullmatch(r"[0-9a-f]{64}", d.sha256) for d in dists)
    assert fsd.TS_DIST.sha256 == "ce6240dc42b6a483a4280935b7afac6b55cba735a351a37a9fa63fe56b03bd7d"
    files = [SCRIPTS / "fetch_sample_data.py", *(SCRIPTS / "sample_data").glob("*.py")]
    sources = {p.name: p.read_text() for p in files}
    for needle in ("urlopen(", '"download"'):  # fetching bytes: in the pinned module only
        assert sorted(n for n, text in sources.items() if needle in text) == ["pinned.py"], needle
    assert not [n for n, text in sources.items() if "urlretrieve" in text or "requests." in text]
    assert sources["pinned.py"].count('"download"') == 1  # the one pip download command
    # publishing a file: only through lib.io.atomic (no writer of its own)
    assert not [n for n, text in sources.items() if "os.replace(" in text]


def _tar(path: Path, members: dict, top: str = "pkg-1.0") -> None:
    import io

    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_extraction_takes_the_members_and_folders_asked_for(tmp_path):
    arch = tmp_path / "pkg-1.0.tar.gz"
    _tar(arch, {"tests/ref/a.nii.gz": b"a", "tests/ref/sub/b.txt": b"b", "tests/other.txt": b"x", "LICENSE": b"L"})
    dist = pinned.Dist("pkg", "1.0", arch.name, GOOD, ("tests/ref/", "LICENSE"))
    root = pinned.extract_dist(arch, dist, tmp_path)
    assert (root / "tests/ref/sub/b.txt").read_bytes() == b"b" and (root / "LICENSE").read_bytes() == b"L"
    assert not (root / "tests/other.txt").exists()
    assert (root / ".extracted").read_text() == f"{GOOD}\nLICENSE\ntests/ref/\n"
    with pytest.raises(common.FetchError, match="lacks"):
        pinned.extract_dist(arch, pinned.Dist("pkg", "2.0", arch.name, GOOD, ("NOTICE",)), tmp_path)
    evil = tmp_path / "evil.tar.gz"
    _tar(evil, {"../../escape.txt": b"e"})
    with pytest.raises(common.FetchError, match="unsafe path"):
        pinned.extract_dist(evil, pinned.Dist("evil", "1.0", evil.name, GOOD, ("../../escape.txt",)), tmp_path)
    assert not (tmp_path.parent / "escape.txt").exists()


def test_writers_publish_whole_files_with_the_usual_permissions(tmp_path):
    import numpy as np
    import nibabel as nib

    common.write_nib(np.arange(24).reshape(2, 3, 4), np.eye(4), tmp_path / "a" / "x.nii.gz", np.int16)
    img = nib.load(str(tmp_path / "a" / "x.nii.gz"))
    assert img.get_data_dtype() == np.int16 and np.array_equal(np.asarray(img.dataobj), np.arange(24).reshape(2, 3, 4))
    common.write_json(tmp_path / "d.json", {"k": 1}, force=False)
    common.write_json(tmp_path / "d.json", {"k": 2}, force=False)  # exists: kept without --force
    assert (tmp_path / "d.json").read_text() == '{\n  "k": 1\n}\n'
    assert common.copy_file(tmp_path / "d.json", tmp_path / "c" / "d.json") is True
    assert common.copy_file(tmp_path / "d.json", tmp_path / "c" / "d.json") is False
    for p in (tmp_path / "a" / "x.nii.gz", tmp_path / "d.json", tmp_path / "c" / "d.json"):
        assert (p.stat().st_mode & 0o777) == _default_mode(), p
    assert _leftovers(tmp_path / "a") == ["x.nii.gz"] and _leftovers(tmp_path / "c") == ["d.json"]


def test_atomic_write_via_keeps_the_old_file_when_the_writer_or_the_check_fails(tmp_path):
    dest = tmp_path / "f.txt"
    dest.write_text("old")

    def boom(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write_via(str(dest), boom)
    with pytest.raises(ValueError):
        atomic_write_via(str(dest), lambda tmp: Path(tmp).write_text("new"), verify=lambda tmp: int("x"))
    assert dest.read_text() == "old" and _leftovers(tmp_path) == ["f.txt"]
    atomic_write_via(str(dest), lambda tmp: Path(tmp).write_text("new"), mode=0o640)
    assert dest.read_text() == "new" and (dest.stat().st_mode & 0o777) == 0o640
