"""Atomic file writes and the "is that writer still alive" check, for every writer of the app.

A file is written beside its destination under a temporary name (``.<name>.<pid>.<random><suffix>``), flushed and
fsync'ed, published with one ``os.replace`` and the folder fsync'ed: a reader, or a process killed at any moment,
sees the old content or the new one, whole. The writer's pid in the temporary name lets a later writer remove the
temporaries of writers that died (:func:`pid_alive`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

__all__ = ["fsync_dir", "pid_alive", "atomic_write_bytes_from", "atomic_write_text", "atomic_write_json",
           "atomic_write_via", "TMP_SUFFIX"]

TMP_SUFFIX = ".ensam-tmp"


def fsync_dir(d: str) -> None:
    """fsync a folder (so a rename in it is durable); a no-op where folders cannot be opened."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (killed, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_dead_temps(root: str) -> int:
    """Remove ``*.ensam-tmp`` files under ``root`` whose writer process is gone; returns how many (the datastore at
    start-up, a batch job's results folder at its end)."""
    n = 0
    for d, _, files in os.walk(root):
        for f in files:
            if not f.endswith(TMP_SUFFIX):
                continue
            parts = f.split(".")
            pid = next((p for p in reversed(parts[:-1]) if p.isdigit()), None)
            if pid is not None and pid_alive(int(pid)) and int(pid) != os.getpid():
                continue
            try:
                os.remove(os.path.join(d, f))
                n += 1
            except OSError:
                pass
    return n


def _publish(dest: str, write, suffix: str, binary: bool) -> None:
    d = os.path.dirname(os.path.abspath(dest))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.{os.getpid()}.", suffix=suffix, dir=d)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
        fsync_dir(d)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes_from(src: str, dest: str, suffix: str = TMP_SUFFIX) -> None:
    """Copy the file ``src`` to ``dest`` atomically."""
    def write(out):
        with open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
    _publish(dest, write, suffix, binary=True)


def atomic_write_text(text: str, dest: str, suffix: str = TMP_SUFFIX) -> None:
    _publish(dest, lambda out: out.write(text), suffix, binary=False)


def atomic_write_json(obj: Any, dest: str, suffix: str = TMP_SUFFIX) -> None:
    atomic_write_text(json.dumps(obj, indent=1, default=str), dest, suffix)


def _umask() -> int:
    """The process's umask, read without changing it where /proc says it (else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write_via(dest: str, write: Callable[[str], Any], suffix: str = TMP_SUFFIX,
                     verify: Optional[Callable[[str], Any]] = None, mode: Optional[int] = None) -> None:
    """Publish ``dest`` atomically from a writer that wants a path: ``write(tmp)`` writes the whole new content
    at ``tmp``, a temporary path beside ``dest`` ending in ``suffix`` (``".nii.gz"``: writers that choose the
    format by the extension, such as nibabel or SimpleITK); then ``verify(tmp)``, when given, may raise to refuse
    it. If ``write`` or ``verify`` raises, the temporary file is removed and ``dest`` is left as it was. The
    published file gets ``mode``, by default the permissions a plain ``open(dest, "w")`` would give it (0o666
    less the umask), not the 0o600 of a temporary file."""
    d = os.path.dirname(os.path.abspath(dest))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.{os.getpid()}.", suffix=suffix, dir=d)
    os.close(fd)
    try:
        write(tmp)
        if verify is not None:
            verify(tmp)
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        fsync_dir(d)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
