"""SHA-256 of a file's bytes, read in 1 MiB blocks: the weights' version (batch results, ``/info``), the quality
gate's engine record. (``scripts/sample_data/pinned.py`` keeps its own: it runs before this package is importable.)"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO, Union

__all__ = ["sha256_file"]


def sha256_file(source: Union[str, "os.PathLike", BinaryIO]) -> str:
    """Hex SHA-256 of the file at ``source`` (a path), or of what is left to read of an open binary file."""
    h = hashlib.sha256()
    if hasattr(source, "read"):
        for block in iter(lambda: source.read(1 << 20), b""):
            h.update(block)
        return h.hexdigest()
    with open(source, "rb") as f:
        return sha256_file(f)
