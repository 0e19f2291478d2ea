"""Size limits of requests and uploads, from the environment (README "Settings")."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("ensam.server")


def _mib_env(name: str, default: float) -> int:
    try:
        return int(float(os.environ.get(name, default)) * 2**20)
    except ValueError:
        logger.warning(f"{name}={os.environ.get(name)!r} is not a number; using {default}")
        return int(default * 2**20)


MAX_UPLOAD_BYTES = _mib_env("ENSAM_MAX_UPLOAD_MB", 1024)  # multipart bodies (image / label uploads)
MAX_BODY_BYTES = _mib_env("ENSAM_MAX_BODY_MB", 4)  # any other body (JSON requests, forms)
MAX_UPLOAD_VOXELS = int(float(os.environ.get("ENSAM_MAX_VOXELS", 2**30)))
_DRAIN_BYTES = 64 * 2**20  # an over-long body is read (and dropped) up to this much so that the client gets the 413
