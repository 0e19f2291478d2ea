"""Size limits of requests and uploads, from the environment (declared in ``lib.settings.ENV``; README "Settings").
Every ``ENSAM_*`` environment setting of ``lib.settings.ENV`` is checked here, i.e. when the server starts: a bad
value stops it, naming the variable. (``lib.settings`` is the one ``lib`` module ``lib.http`` imports when it is
imported: it holds no state and no class compared by identity, like ``lib.monailabel_patches``.)"""

from __future__ import annotations

from lib.settings import check_environment, env_value

check_environment()
MAX_UPLOAD_BYTES = int(env_value("ENSAM_MAX_UPLOAD_MB") * 2**20)  # multipart bodies (image / label uploads)
MAX_BODY_BYTES = int(env_value("ENSAM_MAX_BODY_MB") * 2**20)  # any other body (JSON requests, forms)
MAX_UPLOAD_VOXELS = env_value("ENSAM_MAX_VOXELS")
_DRAIN_BYTES = 64 * 2**20  # an over-long body is read (and dropped) up to this much so that the client gets the 413
