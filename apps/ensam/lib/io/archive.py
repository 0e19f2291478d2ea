"""Unpacking an uploaded archive (tar, compressed or not, or zip) member by member into a NEW folder, safely.

monailabel 0.8.5 unpacks a session's archive with ``shutil.unpack_archive``: a member named ``../../x`` or
``/tmp/x``, or a link followed by a file of the same name, is written outside the folder (as the server's user), and
nothing bounds the number of members or their size. Here every member is checked before anything is written:

* its name is relative, with no ``..`` part, no backslash and no control character (``./`` parts are dropped);
* it is a regular file or a folder: links (symbolic or hard), devices and fifos are refused;
* no name appears twice (a later member would replace an earlier one);
* at most ``max_members`` members (``ENSAM_MAX_ARCHIVE_MEMBERS``, default 10000) and ``max_bytes`` uncompressed
  bytes in all (``ENSAM_MAX_ARCHIVE_MB``, default 2048 MiB): over a bound is a 413. The declared sizes are summed
  before anything is written and the bytes actually written are counted too.

Files are created with ``O_EXCL | O_NOFOLLOW`` (never through an existing name), with the process's default
permissions (no owner, mode or time is taken from the archive). On any refusal nothing is left: the destination
folder, which must not exist before, is removed. Pure Python: no MONAI Label import.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from typing import Iterator, List, Optional, Tuple

from ..errors import RequestError

__all__ = ["ArchiveError", "archive_kind", "extract_archive", "max_archive_members", "max_archive_bytes"]

_CHUNK = 1 << 20


class ArchiveError(RequestError):
    """An archive that is refused: ``status_code`` 400 (not an archive, a member breaking a rule) or 413 (over a
    bound); the message names the member and the rule."""


def _env_number(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return float(default)
    return value if value > 0 else float(default)


def max_archive_members() -> int:
    """``ENSAM_MAX_ARCHIVE_MEMBERS`` (default 10000: a thin-slice CT series is a few thousand files)."""
    return int(_env_number("ENSAM_MAX_ARCHIVE_MEMBERS", 10000))


def max_archive_bytes() -> int:
    """``ENSAM_MAX_ARCHIVE_MB`` in bytes (default 2048 MiB uncompressed)."""
    return int(_env_number("ENSAM_MAX_ARCHIVE_MB", 2048) * 2**20)


def archive_kind(path: str) -> Optional[str]:
    """``"zip"``, ``"tar"`` (plain, gzip, bzip2 or xz) or None when ``path`` is neither."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        with tarfile.open(path, "r:*") as t:
            t.next()
        return "tar"
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return None


def _parts(name: str) -> List[str]:
    """The checked path parts of a member name (raises ArchiveError naming the rule it breaks)."""
    shown = name if len(name) <= 200 else name[:200] + "..."
    if any(ord(c) < 32 for c in name):
        raise ArchiveError(f"archive member {shown!r}: control characters in a member name are not accepted")
    if "\\" in name:
        raise ArchiveError(f"archive member {shown!r}: a backslash in a member name is not accepted (use '/')")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"archive member {shown!r}: an absolute path is not accepted; members must be relative")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"archive member {shown!r}: a '..' part is not accepted (it could leave the folder)")
    if any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts):
        raise ArchiveError(f"archive member {shown!r}: a name part over 255 bytes is not accepted")
    return parts


def _tar_members(path: str) -> Iterator[Tuple[str, str, int, object]]:
    """(name, kind, size, handle) of every tar member; kind 'file', 'dir' or what it is when refused."""
    with tarfile.open(path, "r:*") as t:
        for m in t:
            if m.isreg():
                kind = "file"
            elif m.isdir():
                kind = "dir"
            elif m.issym():
                kind = f"a symbolic link (to {m.linkname!r})"
            elif m.islnk():
                kind = f"a hard link (to {m.linkname!r})"
            elif m.ischr() or m.isblk():
                kind = "a device"
            elif m.isfifo():
                kind = "a fifo"
            else:
                kind = f"of tar type {m.type!r}"
            yield m.name, kind, int(m.size) if kind == "file" else 0, (t, m)


def _zip_members(path: str) -> Iterator[Tuple[str, str, int, object]]:
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            mode = (info.external_attr >> 16) & 0xFFFF
            kind = "dir" if info.is_dir() else "file"
            if info.create_system == 3 and stat.S_IFMT(mode):  # a Unix entry says what it is
                if stat.S_ISLNK(mode):
                    kind = "a symbolic link"
                elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                    kind = "a device"
                elif stat.S_ISFIFO(mode):
                    kind = "a fifo"
                elif stat.S_ISSOCK(mode):
                    kind = "a socket"
                elif stat.S_ISDIR(mode):
                    kind = "dir"
                elif not stat.S_ISREG(mode):
                    kind = "not a regular file"
            yield info.filename, kind, int(info.file_size) if kind == "file" else 0, (z, info)


def _members(path: str, kind: str) -> Iterator[Tuple[str, str, int, object]]:
    return _zip_members(path) if kind == "zip" else _tar_members(path)


def _open_member(handle):
    container, member = handle
    if isinstance(container, zipfile.ZipFile):
        return container.open(member)
    f = container.extractfile(member)
    if f is None:
        raise ArchiveError(f"archive member {member.name!r} cannot be read")
    return f


def _check_all(path: str, kind: str, max_members: int, max_bytes: int) -> None:
    """Every member's name and type, the member count and the declared total, before anything is written."""
    seen, count, total = {}, 0, 0
    for name, what, size, _ in _members(path, kind):
        count += 1
        if count > max_members:
            raise ArchiveError(f"the archive has more than {max_members} members (server setting "
                               f"ENSAM_MAX_ARCHIVE_MEMBERS)", status_code=413)
        parts = _parts(name)
        if what not in ("file", "dir"):
            raise ArchiveError(f"archive member {name!r} is {what}: links, devices and fifos are not accepted, "
                               f"only regular files and folders")
        if not parts:
            if what == "file":
                raise ArchiveError(f"archive member {name!r}: a file needs a name")
            continue
        key = "/".join(parts)
        if key in seen and not (seen[key] == "dir" and what == "dir"):
            raise ArchiveError(f"archive member {name!r} appears twice in the archive")
        seen[key] = what
        total += size
        if total > max_bytes:
            raise ArchiveError(f"the archive holds more than {max_bytes / 2**20:g} MiB uncompressed (server setting "
                               f"ENSAM_MAX_ARCHIVE_MB)", status_code=413)


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def extract_archive(archive: str, dest: str, max_members: Optional[int] = None,
                    max_bytes: Optional[int] = None) -> List[str]:
    """Extract ``archive`` (tar, tar.gz / .tgz / .bz2 / .xz, or zip) into the NEW folder ``dest``; returns the paths
    of the regular files written, in archive order. Raises :class:`ArchiveError` (400 / 413) and leaves no
    ``dest`` behind when the archive or any member breaks a rule (see the module doc)."""
    max_members = max_archive_members() if max_members is None else int(max_members)
    max_bytes = max_archive_bytes() if max_bytes is None else int(max_bytes)
    kind = archive_kind(archive)
    if kind is None:
        raise ArchiveError(f"{os.path.basename(archive)!r} is not an archive this server unpacks: a tar (plain, "
                           f".tar.gz / .tgz, .tar.bz2, .tar.xz) or a zip file")
    os.makedirs(dest)  # a new folder: FileExistsError when it exists
    root = os.path.realpath(dest)
    written: List[str] = []
    try:
        _check_all(archive, kind, max_members, max_bytes)
        total = 0
        for name, what, _, handle in _members(archive, kind):
            parts = _parts(name)
            if not parts:
                continue
            target = os.path.join(root, *parts)
            parent = target if what == "dir" else os.path.dirname(target)
            os.makedirs(parent, exist_ok=True)
            if not _inside(root, parent):  # cannot happen after the name rules: checked all the same
                raise ArchiveError(f"archive member {name!r} would be written outside its folder")
            if what == "dir":
                continue
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as out, _open_member(handle) as src:
                while True:
                    chunk = src.read(_CHUNK)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > max_bytes:
                        raise ArchiveError(f"the archive holds more than {max_bytes / 2**20:g} MiB uncompressed "
                                           f"(server setting ENSAM_MAX_ARCHIVE_MB)", status_code=413)
                    out.write(chunk)
            written.append(target)
    except ArchiveError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError) as e:
        shutil.rmtree(dest, ignore_errors=True)  # a corrupt / truncated archive, a member that is not what it says
        raise ArchiveError(f"the archive {os.path.basename(archive)!r} cannot be unpacked: {type(e).__name__}: "
                           f"{str(e).replace(root, '<folder>')}") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return written
