"""Request rules shared by the routes: ids and tags (plain names, bounded in bytes), the per-id lock of saves,
uploads and deletes, bounded JSON, known task names."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Dict, Optional

from fastapi import HTTPException
from monailabel.interfaces.utils.app import app_instance

from .limits import MAX_BODY_BYTES

logger = logging.getLogger("ensam.server")


# ---------------------------------------------------------------------------------------------------- ids
ID_RULE = ("image and label ids name datastore entries (a file name without extension such as 'ct_small', or a "
           "DICOM SeriesInstanceUID), they are not a file path: no '/' or '\\', not '.' or '..', no leading '~', "
           "no control characters, at most 200 bytes in UTF-8")
TAG_RULE = ("label tags are plain names such as 'final' or 'original', not a file path: no '/' or '\\', not '.' "
            "or '..', no leading '~', at most 200 bytes in UTF-8")
# An id becomes a file name: id + extension (longest kept by the datastore: '.nii.gz', 7 bytes) and, while it is
# written, the temporary name '.<name>.<pid>.<8 random>.ensam-tmp' (28 bytes more, lib/io/atomic.py): 200 + 7 + 28
# = 235 bytes fit the file systems' 255-byte limit (ids of 220+ bytes were a 500: ENAMETOOLONG). Counted in bytes:
# 110 two-byte characters are 220 bytes.
MAX_ID_BYTES = 200
_ID_QUERY_KEYS = {"image": "image id", "id": "image id", "label": "label id", "session_id": "session id",
                  "tag": "label tag", "label_tag": "label tag"}


def id_problem(value: Any, what: str = "image id") -> Optional[str]:
    """Why ``value`` is not a valid id / tag (``what`` says which), or None when it is one."""
    if not isinstance(value, str):
        return f"{what} {value!r} must be a string"
    rule = TAG_RULE if what == "label tag" else ID_RULE
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_ID_BYTES:
        return f"{what} {value[:40]!r}... is not valid: {size} bytes in UTF-8, at most {MAX_ID_BYTES} bytes: {rule}"
    if (value in (".", "..") or value.startswith("~") or any(c in value for c in "/\\")
            or any(ord(c) < 32 for c in value)):
        return f"{what} {value!r} is not valid: {rule}"
    return None


def _check_id(value: Any, what: str = "image id") -> None:
    problem = id_problem(value, what)
    if problem:
        raise HTTPException(status_code=400, detail=problem)


_ID_LOCKS = [threading.Lock() for _ in range(64)]


def _id_lock(image_id: str) -> threading.Lock:
    """The lock under which this server writes datastore image ``image_id`` (a label save from the image check to
    the write, an image upload, a DELETE of the image and its labels), so that they run one after the other (issue
    25 #11: a save racing a DELETE was a 500 or left an orphan label). 64 locks shared by all ids (striped); held by
    thread-pool routes only, never nested. Across processes the datastore's file lock does the same
    (lib/monailabel_patches/atomic_datastore.py)."""
    return _ID_LOCKS[hash(image_id) % len(_ID_LOCKS)]


def _datastore_image(image_id: str) -> str:
    """The file (or DICOM series folder) of datastore image ``image_id``; 400 for a path-like id, 404 if unknown."""
    _check_id(image_id)
    uri = app_instance().datastore().get_image_uri(image_id)
    if not uri or not os.path.exists(uri):
        raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore")
    return uri


def _check_image_ids(images: Any, field: str = "images") -> None:
    """A request's list of image ids (a list, or a comma-separated string): each valid and in the datastore."""
    ids = [s.strip() for s in images.split(",") if s.strip()] if isinstance(images, str) else images
    if not isinstance(ids, (list, tuple)):
        raise HTTPException(status_code=400, detail=f"'{field}' must be a list of datastore image ids, got {images!r}")
    for i in ids:
        _check_id(i)
    known = set(app_instance().datastore().list_images())
    missing = sorted(str(i) for i in ids if i not in known)
    if missing:
        raise HTTPException(status_code=404, detail=f"'{field}': not in the datastore: {missing}")


def _json_value(text: Any, field: str) -> Any:
    """``text`` parsed as JSON within the bounds of every JSON the server takes or stores (lib/io/json_bounds.py:
    at most 32 levels deep, finite numbers; the datastore index, read by pydantic at start-up, stops at 200 levels):
    400 naming the bound; 413 over the body limit."""
    from lib.io.json_bounds import JSONBoundsError, loads_bounded  # the app's lib (see the module docstring)

    if len(text) > MAX_BODY_BYTES:
        raise HTTPException(status_code=413, detail=f"'{field}' is larger than {MAX_BODY_BYTES / 2**20:g} MiB "
                                                    f"(server setting ENSAM_MAX_BODY_MB)")
    try:
        return loads_bounded(text, f"'{field}'")
    except JSONBoundsError as e:
        raise HTTPException(status_code=400, detail=str(e)) from None


def _json_object(text: Optional[str], field: str) -> Dict[str, Any]:
    """A JSON object given as text (a form field: ``params``, ``info``), within the JSON bounds (``_json_value``)."""
    if not text:
        return {}
    value = _json_value(text, field)
    if not isinstance(value, dict):
        raise HTTPException(status_code=400, detail=f"'{field}' must be a JSON object, got {type(value).__name__}")
    return value


_TASK_WORDS = {"infer": "infer task", "train": "train task", "strategy": "strategy", "scoring": "scoring method"}


def _task(kind: str, name: str, what: str = "") -> Any:
    """The app's task ``name`` of ``kind`` (``infer``, ``train``, ``strategy``, ``scoring``); 404 naming ``what``
    (default: the kind in words) and the known names when there is none."""
    from lib.monailabel_patches import app_tasks  # the app's lib (see lib.server's loading rule)

    tasks = app_tasks(app_instance(), kind)
    if name not in tasks:
        raise HTTPException(status_code=404, detail=f"no {what or _TASK_WORDS[kind]} {name!r}; known: {sorted(tasks)}")
    return tasks[name]
