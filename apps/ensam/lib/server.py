"""The uvicorn app for ensam: monailabel's FastAPI app with a NON-BLOCKING ``POST /infer/{model}``.

monailabel 0.8.5 declares ``/infer/{model}`` as an ``async`` route that runs the inference synchronously, so one
inference freezes the whole server (``/info`` included). Here a plain ``def`` route with the same signature is put
first in the router: FastAPI runs it in its thread pool, the event loop stays free, and the engine provider's
per-device semaphore keeps concurrent inferences safe. The route also turns bad requests into 4xx answers with a
clear message (monailabel itself answers 500 to any exception).

``POST /train/{model}`` is checked by the train task before monailabel starts the training process (monailabel
accepts anything and the error only shows in the training log): a bad parameter is 400 with the reason.

It also replaces monailabel's DICOMweb proxy (``/proxy/dicom/...``, what OHIF reads through) by
``lib.http.proxy``: GET-only, confined to the DICOMweb reads a viewer makes (monailabel's forwarded any path, ``..``
included, to the PACS's whole REST API with the stored credentials), the client's ``Accept`` header and query
string forwarded, off the event loop. The token check of the authentication mode is ``lib.http.auth``.

Request rules (monailabel 0.8.5 checks none of them; issue 10):

* ids: every image / label id (query ``image``, ``id``, ``label``; ``session_id``; batch and scoring ``images``; the
  keys of a batch manifest) names a datastore entry and every label tag (``tag``, ``label_tag``) is a plain name:
  a value that is a file path (``/``, ``\\``, ``.``, ``..``, a leading ``~``) is refused with 400 before any
  route runs (``RequestGuard``), an id the datastore does not hold is 404. ``params`` of an inference may not name
  another image than ``?image=``. Only an uploaded file or a session gives an image from outside the datastore.
* unknown infer / batch / scoring / strategy / train names are 404 listing the known ones.
* uploads (``PUT /datastore/image``, ``PUT /datastore/label``, an inference's ``file``, ``PUT /session/``) must be
  readable 3D volumes (a label: on its image's grid, 422 otherwise) within the bounds of
  ``lib.io.imageio.UploadLimits`` (spacing, extent, geometry, NIfTI extensions, DICOM pixel data: checked from the
  header); anything else is 400 / 413 and nothing is stored. Sessions: plain file names, archives unpacked member
  by member by ``lib.io.archive`` (issue 25; monailabel's route wrote archive members outside its folder).
* size: a request body is at most ``ENSAM_MAX_UPLOAD_MB`` (multipart uploads, default 1024) or
  ``ENSAM_MAX_BODY_MB`` (anything else, e.g. JSON, default 4) MiB, else 413 (``RequestGuard``); an uploaded
  volume at most ``ENSAM_MAX_VOXELS`` voxels (default 2**30); the prompt limits are in ``request_parsing``.
* JSON (issue 25): every JSON form field (``params``, ``info``) and JSON body is at most 32 levels deep with finite
  numbers only (``_json_value``, ``RequestGuard``; lib/io/json_bounds.py), ids at most ``MAX_ID_BYTES`` (200)
  bytes in UTF-8; saves and deletes of one image id run one after the other (``_id_lock``).
* errors: only the project's own validation errors (``RequestError``, ``PromptError``, monailabel's "not found" /
  invalid input) are 4xx, logged as one line; anything else is a 500 with its traceback in the log.

Start it with ``monailabel start_server ... --uvicorn_app lib.server:app`` and ``<repo>/apps/ensam`` on
PYTHONPATH (the Makefile's ``serve`` target does both).

Loading rule: monailabel's app loader unloads every ``lib.*`` module before it executes ``main.py``, so this module
is imported once by uvicorn and then dropped from ``sys.modules`` while its objects stay alive. It therefore
imports nothing from ``lib`` at import time but ``lib.monailabel_patches`` (stateless: every patch of monailabel's
internals, with the monailabel version check) and ``lib.http`` (the token check and the proxy, which import no other
``lib`` module) (the request handlers import the few helpers they need when they run,
and so get the app's own modules): errors are recognised by module and class name, never by class identity (the
classes are re-created by the loader).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
import threading
from fnmatch import fnmatch
from typing import Any, Dict, Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.middleware import Middleware
from monailabel.app import app
from monailabel.config import RBAC_ADMIN, RBAC_ANNOTATOR, RBAC_USER, settings
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import (ImageNotFoundException, LabelNotFoundException, MONAILabelError,
                                             MONAILabelException)
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import remove_file

# every monailabel internal that ensam patches is reached from this one module (stateless: safe to import here)
from lib.http.auth import ASYMMETRIC_ALGORITHMS, make_current_user, token_user  # noqa: F401 (re-exported)
from lib.http.proxy import dicomweb_proxy
from lib.monailabel_patches import (OHIF_DIR, add_middleware_once, check_version, install_token_check, ohif_file,
                                    put_exception_handler, put_routes_first)

logger = logging.getLogger("ensam.server")

__all__ = ["app", "OHIF_DIR", "RequestGuard", "add_image_checked", "batch_infer_checked", "delete_model_checked",
           "dicomweb_proxy", "http_error_for", "id_problem", "next_sample_checked", "ohif_file",
           "save_label_checked", "scoring_checked", "train_checked", "update_model_checked", "delete_image_checked",
           "train_all_checked", "create_session_checked"]

check_version()  # a warning naming the monailabel version the patches were written for, when another is installed


# ---------------------------------------------------------------------------------------------------- errors
# The project's own request-validation errors, by (module, class name): the loader re-creates lib.* classes, so
# class identity cannot be used (see the module docstring). Everything else is a server fault.
_VALIDATION_ERRORS = {("lib.errors", "RequestError"): 400, ("lib.geometry", "PromptError"): 422}


def http_error_for(exc: BaseException) -> Optional[HTTPException]:
    """The 4xx answer for a request error, or None for a server fault (-> 500 with the traceback logged).

    4xx only for: HTTPException; ensam's RequestError (its ``status_code``) and PromptError (422); monailabel's
    own "not found" (404) and INVALID_INPUT (400; 404 for "no model") errors. A ValueError, FileNotFoundError,
    ... raised anywhere else is not the client's error."""
    if isinstance(exc, HTTPException):
        return exc
    for cls in type(exc).__mro__:
        default = _VALIDATION_ERRORS.get((cls.__module__, cls.__name__))
        if default is not None:
            code = getattr(exc, "status_code", default)
            return HTTPException(status_code=code if isinstance(code, int) and 400 <= code < 500 else default,
                                 detail=str(exc))
    if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)):
        return HTTPException(status_code=404, detail=str(exc.msg))
    if isinstance(exc, MONAILabelException) and exc.error == MONAILabelError.INVALID_INPUT:
        code = 404 if "no model" in str(exc.msg).lower() else 400
        return HTTPException(status_code=code, detail=exc.msg)
    return None


def _raise_for(exc: BaseException, what: str) -> None:
    """Re-raise ``exc`` as its 4xx answer (one log line) or as a 500 (logged with its traceback)."""
    err = http_error_for(exc)
    if err is None:
        logger.exception(f"{what} failed")
        raise HTTPException(status_code=500, detail=f"{what} failed: {type(exc).__name__}: {exc}") from exc
    logger.warning(f"rejected request ({err.status_code}): {what}: {err.detail}")
    raise err from None


async def monailabel_exception_handler(request: Request, exc: MONAILabelException):
    """monailabel's own routes (datastore, sessions, ...) raise MONAILabelException for an unknown id: 404, not 500."""
    err = http_error_for(exc)
    if err is None:
        logger.error(f"{request.method} {request.url.path} failed: {exc.error}: {exc.msg}", exc_info=exc)
        return JSONResponse(status_code=500, content={"detail": f"{exc.error.value}: {exc.msg}"})
    logger.warning(f"rejected request ({err.status_code}): {request.method} {request.url.path}: {err.detail}")
    return JSONResponse(status_code=err.status_code, content={"detail": err.detail})


# ---------------------------------------------------------------------------------------------------- auth
# ensam's token check (lib/http/auth.py): asymmetric signatures only, realm keys cached with a bounded refresh,
# audience / issuer when set, run in the thread pool (monailabel 0.8.5 refused every token with PyJWT 2).
install_token_check(app, token_user, make_current_user())


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
    (lib/datastore.py)."""
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


def _known(kind: str, name: str, tasks: Dict[str, Any]) -> None:
    if name not in tasks:
        raise HTTPException(status_code=404, detail=f"no {kind} {name!r}; known: {sorted(tasks)}")


# ---------------------------------------------------------------------------------------------------- size
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


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` while a route reads a body over the limit (FastAPI passes HTTPException on)."""


class RequestGuard:
    """ASGI middleware (inside CORS, so that browsers read its answers): the id rule on the query and the
    ``/session/{id}`` path (400), the request body size (413, naming the limit) and the bounds of a JSON body
    (depth, finite numbers: 400)."""

    def __init__(self, app):
        self.app = app

    @staticmethod
    def _id_problem(scope) -> Optional[str]:
        from urllib.parse import parse_qsl

        query = scope.get("query_string", b"").decode("latin-1")
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key in _ID_QUERY_KEYS and value:
                problem = id_problem(value, _ID_QUERY_KEYS[key])
                if problem:
                    return problem
        prefix = f"{settings.MONAI_LABEL_API_STR}/session/"
        path = scope.get("path", "")
        if path.startswith(prefix) and path[len(prefix):]:
            return id_problem(path[len(prefix):].rstrip("/"), "session id")
        return None

    @staticmethod
    async def _answer(send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _drain(receive, budget: int) -> None:
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self._id_problem(scope)
        if problem:
            logger.warning(f"rejected request (400): {scope.get('method')} {scope.get('path')}: {problem}")
            await self._drain(receive, _DRAIN_BYTES)
            return await self._answer(send, 400, problem)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        multipart = headers.get("content-type", "").lower().startswith("multipart/")
        limit, env = (MAX_UPLOAD_BYTES, "ENSAM_MAX_UPLOAD_MB") if multipart else (MAX_BODY_BYTES, "ENSAM_MAX_BODY_MB")
        detail = (f"request body too large: at most {limit / 2**20:g} MiB for "
                  f"{'a multipart upload' if multipart else 'this request'} (server setting {env})")
        try:
            declared = int(headers.get("content-length", ""))
        except ValueError:
            declared = None
        if declared is not None and declared > limit:
            logger.warning(f"rejected request (413): {scope.get('method')} {scope.get('path')}: {declared} bytes")
            await self._drain(receive, min(declared, _DRAIN_BYTES))
            return await self._answer(send, 413, detail)

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body", False):
                        await self._drain(receive, _DRAIN_BYTES)
                    logger.warning(f"rejected request (413): {scope.get('method')} {scope.get('path')}: over "
                                   f"{limit} bytes")
                    raise BodyTooLarge(status_code=413, detail=detail)
            return message

        if _is_json(headers.get("content-type", "")):
            return await self._json_body(scope, limited_receive, send, detail)
        return await self.app(scope, limited_receive, send)

    async def _json_body(self, scope, receive, send, too_large: str):
        """A JSON body (train / batch / scoring / active learning requests, which FastAPI parses with Python's
        JSON parser: NaN, Infinity and any depth up to a RecursionError) is read here and checked against the JSON
        bounds (``_json_value``) before any route runs: 400 naming the bound. Text that is not JSON at all goes on
        to FastAPI (its own 422)."""
        from lib.io.json_bounds import JSONBoundsError, loads_bounded  # the app's lib (see the module docstring)

        chunks = []
        while True:
            try:
                message = await receive()
            except BodyTooLarge:
                return await self._answer(send, 413, too_large)
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body.strip():
            try:
                loads_bounded(body, "the JSON request body")
            except JSONBoundsError as e:
                if not e.invalid:
                    logger.warning(f"rejected request (400): {scope.get('method')} {scope.get('path')}: {e}")
                    return await self._answer(send, 400, str(e))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _is_json(content_type: str) -> bool:
    """Whether a Content-Type is JSON as FastAPI reads it (``application/json``, ``application/*+json``)."""
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


# ---------------------------------------------------------------------------------------------------- uploads
def _upload_suffix(filename: Optional[str], default: str = ".nii.gz") -> str:
    suffixes = pathlib.Path(os.path.basename(filename or "")).suffixes
    return "".join(suffixes[-2:]) if suffixes[-2:-1] == [".nii"] or suffixes[-2:-1] == [".seg"] else (
        suffixes[-1] if suffixes else default)


def _save_upload(upload: UploadFile, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="ensam_upload_")
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(upload.file, out)
    return path


def _check_volume_upload(path: str, what: str, filename: Optional[str]):
    """The [i, j, k] shape of an uploaded volume; 400 (or 413) naming ``what`` when it is not a 3D image."""
    from lib.io.imageio import volume_shape_of_upload  # the app's lib (see the module docstring)

    shown = os.path.basename(filename or "") or os.path.basename(path)
    try:
        return volume_shape_of_upload(path, what=what, max_voxels=MAX_UPLOAD_VOXELS)
    except Exception as e:  # noqa: BLE001 - RequestError -> 4xx; anything else is a fault of the server
        if http_error_for(e) is None:
            raise
        raise HTTPException(status_code=http_error_for(e).status_code,
                            detail=str(e).replace(os.path.basename(path), shown)) from None


def _check_raw_label(size: int, shape, image: str) -> None:
    """OHIF's raw label (``.bin``): one byte per voxel of image ``image`` (of ``shape``), else 422 naming both."""
    voxels = 1
    for d in shape:
        voxels *= int(d)
    if size != voxels:
        raise HTTPException(status_code=422, detail=f"the raw label (.bin) has {size} bytes; image {image!r} "
                                                    f"has {voxels} voxels {list(shape)} (one byte each)")


def _check_infer_raw_label(label: Optional[UploadFile], image: str, file, session_id: str) -> None:
    """An inference's raw ``.bin`` label (OHIF scribbles) is read by monailabel on the datastore image's grid
    (``binary_to_image``, whose reshape of a wrong-size file was a 500): it needs ``?image=`` (400) and one byte
    per voxel of that image (422), checked before anything runs. monailabel's own test of the name is kept."""
    from lib.io.imageio import volume_shape  # the app's lib (see the module docstring)

    if label is None or "".join(pathlib.Path(label.filename or "").suffixes) != ".bin":
        return
    if file or session_id or not image:
        raise HTTPException(status_code=400, detail="a raw label (.bin) is read on the grid of a datastore image: "
                                                    "give ?image=<datastore id>, not a 'file' upload or a session")
    shape = tuple(volume_shape(_datastore_image(image)))
    label.file.seek(0, os.SEEK_END)
    size = label.file.tell()
    label.file.seek(0)
    _check_raw_label(size, shape, image)


def add_image_checked(
    background_tasks: BackgroundTasks,
    image: Optional[str] = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    """PUT ``/datastore/image`` (and the deprecated ``PUT /datastore/``): only a readable 3D volume, under a valid
    id, is stored; anything else is 400 and leaves nothing behind (monailabel stored any bytes and listed them)."""
    name = os.path.basename(file.filename or "")
    patterns = [p for p in settings.MONAI_LABEL_DATASTORE_FILE_EXT]
    matching = [p for p in patterns if fnmatch(name.lower(), p.lower())]
    if not matching:
        raise HTTPException(status_code=400, detail=f"the uploaded file name {name!r} has none of the extensions "
                                                    f"the datastore keeps: {patterns}")
    ext = max((p.lstrip("*") for p in matching), key=len)
    image_id = image or name[: -len(ext)]
    _check_id(image_id)
    info = _json_object(params, "params")
    tmp = _save_upload(file, ext)
    try:
        _check_volume_upload(tmp, "image", name)
        if user.username:
            info["user"] = user.username
        with _id_lock(image_id):  # replaces every file of the id (other extensions, old labels set aside)
            image_id = app_instance().datastore().add_image(image_id, tmp, info)
    finally:
        remove_file(tmp)
    logger.info(f"image {image_id!r} added ({name})")
    return {"image": image_id}


def save_label_checked(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    """PUT ``/datastore/label``: the image must be in the datastore (404), the tag a plain name, the label a
    readable 3D volume (400) on the image's grid (422; OHIF's raw ``.bin`` voxels: one byte per image voxel)."""
    from lib.io.imageio import volume_shape  # the app's lib (see the module docstring)

    tag = tag or DefaultLabelTag.FINAL.value
    _check_id(tag, "label tag")
    _check_id(image)
    info = _json_object(params, "params")
    suffix = _upload_suffix(label.filename)
    tmp = _save_upload(label, suffix)
    try:
        with _id_lock(image):  # the image checked and the label written with no DELETE of the image between them
            image_uri = _datastore_image(image)
            shape = tuple(volume_shape(image_uri))
            if suffix.lower() == ".bin":
                _check_raw_label(os.path.getsize(tmp), shape, image)
            else:
                got = tuple(_check_volume_upload(tmp, "label", label.filename))
                if got != shape:
                    raise HTTPException(status_code=422, detail=f"the label's shape {list(got)} differs from the "
                                                                f"shape {list(shape)} of image {image!r}")
            instance = app_instance()
            label_id = instance.datastore().save_label(image, tmp, tag, info)
        res = instance.on_save_label(image, label_id) or {}
    except Exception as e:  # noqa: BLE001
        _raise_for(e, f"saving the label of {image!r} (tag {tag!r})")
    finally:
        remove_file(tmp)
    res.update({"image": image, "label": label_id})
    return res


# ---------------------------------------------------------------------------------------------------- misc routes
# monailabel routes that answered 500 to the schema-driven fuzz of the API (tests/test_hostile_input.py)
def update_image_info_checked(image: str, info: str = Form("{}"),
                              user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    """PUT ``/datastore/image/info``: ``info`` must be a JSON object (400; monailabel: 500), the image known (404)."""
    _check_id(image)
    i = _json_object(info, "info")
    if user.username:
        i["user"] = user.username
    try:
        return app_instance().datastore().update_image_info(image, i)
    except Exception as e:  # noqa: BLE001
        _raise_for(e, f"updating the info of image {image!r}")


def update_label_info_checked(label: str, tag: str, info: str = Form("{}"),
                              user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    """PUT ``/datastore/label/info``: ``info`` must be a JSON object (400; monailabel: 500), the label known (404)."""
    _check_id(label, "label id")
    _check_id(tag, "label tag")
    i = _json_object(info, "info")
    if user.username:
        i["user"] = user.username
    try:
        return app_instance().datastore().update_label_info(label, tag, i)
    except Exception as e:  # noqa: BLE001
        _raise_for(e, f"updating the info of label {label!r} (tag {tag!r})")


def delete_image_checked(id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    """DELETE ``/datastore/image`` (and the deprecated ``DELETE /datastore/``): the image, every file of its id and
    its labels (every tag) go, under the id's lock (a label save of that id waits, then finds no image: 404);
    unknown id: 404. monailabel's route ran on the event loop, outside any lock: a save racing it left an orphan
    label, and a second file of the id (another extension) stayed listed (issue 25 #11, #12)."""
    _check_id(id)
    try:
        with _id_lock(id):
            app_instance().datastore().remove_image(id)
    except Exception as e:  # noqa: BLE001
        _raise_for(e, f"deleting image {id!r}")
    logger.info(f"image {id!r} deleted with its labels by {user.username or 'anonymous'}")
    return {}


def download_dataset_checked(limit_cases: Optional[int] = None,
                             user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    """GET ``/datastore/dataset``: 404 when no image has a final label (monailabel: 500 from an assertion)."""
    if limit_cases is not None and limit_cases < 1:
        raise HTTPException(status_code=400, detail=f"limit_cases must be at least 1, got {limit_cases}")
    ds = app_instance().datastore()
    if not ds.get_labeled_images():
        raise HTTPException(status_code=404, detail="no image has a final label yet: the dataset archive is empty")
    try:
        path = ds.get_dataset_archive(limit_cases)
    except Exception as e:  # noqa: BLE001
        _raise_for(e, "the dataset archive")
    if not path or not os.path.isfile(path):
        raise HTTPException(status_code=404, detail="the dataset archive could not be made")
    return FileResponse(path, media_type="application/zip", filename="dataset.zip")


def gpu_info_checked(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    """GET ``/logs/gpu``: ``nvidia-smi``'s report; 404 on a machine without it (monailabel: 500)."""
    import subprocess

    smi = shutil.which("nvidia-smi")
    if not smi:
        raise HTTPException(status_code=404, detail="no NVIDIA GPU tools (nvidia-smi) on this server")
    out = subprocess.run([smi], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30, check=False).stdout
    return Response(content=out.decode("utf-8", "replace"), media_type="text/plain")


def wsi_infer_unsupported(model: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    """POST ``/infer/wsi_v2/{model}``: whole-slide (pathology) inference, which ensam does not do (monailabel: 500
    for any request). 404 for an unknown model, else 400 pointing to ``/infer/{model}``."""
    _known("infer task", model, getattr(app_instance(), "_infers", None) or {})
    raise HTTPException(status_code=400, detail=f"{model!r} segments 3D volumes, not whole-slide images: use "
                                                f"POST /infer/{model}")


def _sessions_or_406():
    sessions = app_instance().sessions()
    if sessions is None:
        raise HTTPException(status_code=406, detail="sessions are not enabled on this server")
    return sessions


def get_session_checked(session_id: str, update_ts: bool = False, image: bool = False,
                        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    """GET ``/session/{id}``: 406 when sessions are off (monailabel: 500), else monailabel's answer; ``image=true``
    of a session that is a DICOM series (a folder) is 409 (monailabel: 500, a folder is not one file)."""
    from monailabel.endpoints.session import get_session

    sessions = _sessions_or_406()
    if image:
        info = sessions.get_session(session_id, update_ts=False)
        if info and os.path.isdir(info.image):
            raise HTTPException(status_code=409, detail=f"session {session_id!r} is a DICOM series (a folder of "
                                                        f"files): image=true sends one file only; use the session "
                                                        f"for inference (?session_id=)")
    return get_session(session_id, update_ts, image)


def remove_session_checked(session_id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    """DELETE ``/session/{id}``: 406 when sessions are off (monailabel: 500), else monailabel's answer."""
    from monailabel.endpoints.session import remove_session

    _sessions_or_406()
    return remove_session(session_id)


UPLOAD_NAME_RULE = ("an uploaded file's name is a plain file name such as 'ct.nii.gz' or 'IM0001.dcm': no '/' or "
                    "'\\', not '.' or '..', no control characters, at most 255 characters")


def _session_image(folder: str, files: list, archive: str) -> str:
    """What a session's unpacked archive holds: its one file, or the folder of its files (a DICOM series)."""
    if not files:
        raise HTTPException(status_code=400, detail=f"the archive {archive!r} holds no file")
    if len(files) == 1:
        return files[0]
    folders = sorted({os.path.dirname(f) for f in files})
    if len(folders) > 1:
        shown = [os.path.relpath(d, folder) for d in folders[:5]]
        raise HTTPException(status_code=400, detail=f"the archive {archive!r} holds files in {len(folders)} folders "
                                                    f"({shown}): several files must be the DICOM files of one "
                                                    f"series, in one folder")
    return folders[0]


def create_session_checked(
    uncompress: bool = False,
    expiry: int = 0,
    files: list[UploadFile] = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    """PUT ``/session/``: an image for inference that is not stored in the datastore (``?session_id=`` of
    ``/infer``). monailabel unpacked an archive (``uncompress=true``) with ``shutil.unpack_archive``: members named
    ``../../x`` or ``/abs/x``, or a link followed by a file of its name, were written outside the session folder;
    and it checked nothing of the volume (NaN voxels, a header declaring gigabytes). Here: file names must be plain
    names (400); an archive (tar, compressed or not, or zip) is unpacked member by member into a new folder by
    ``lib.io.archive`` (only regular files and folders, no absolute path or '..', bounded member count and size:
    400 / 413); the result (one file, or several files / an archive's files = one DICOM series) goes through the
    same volume checks as every upload; only then is it handed to monailabel's sessions (``uncompress=False``).
    Nothing is left behind on a refusal. The answer is monailabel's: ``{"session_id", "session_info"}``."""
    from lib.io.archive import ArchiveError, extract_archive  # the app's lib (see the module docstring)

    sessions = _sessions_or_406()
    names = [f.filename or "" for f in files]
    for name in names:
        if (not name or name in (".", "..") or any(c in name for c in "/\\") or any(ord(c) < 32 for c in name)
                or len(name) > 255):
            raise HTTPException(status_code=400, detail=f"uploaded file name {name[:300]!r} is not valid: "
                                                        f"{UPLOAD_NAME_RULE}")
    if len(set(names)) != len(names):
        raise HTTPException(status_code=400, detail="two uploaded files have the same name")
    if uncompress and len(files) != 1:
        raise HTTPException(status_code=400, detail=f"uncompress=true takes one archive (tar, tar.gz or zip), got "
                                                    f"{len(files)} files")
    work = tempfile.mkdtemp(prefix="ensam_session_")
    try:
        received = os.path.join(work, "ensam-session-files")  # (folder names never met in a message)
        os.mkdir(received)
        paths = []
        for f, name in zip(files, names):
            paths.append(os.path.join(received, name))
            with open(paths[-1], "xb") as out:
                shutil.copyfileobj(f.file, out, 1 << 20)
        if uncompress:
            unpacked = os.path.join(work, "ensam-session-archive")
            try:
                image = _session_image(unpacked, extract_archive(paths[0], unpacked), names[0])
            except ArchiveError as e:
                logger.warning(f"rejected request ({e.status_code}): PUT /session/: {e}")
                raise HTTPException(status_code=e.status_code, detail=str(e)) from None
            shown = f"{names[0]}: {os.path.relpath(image, unpacked)}" if image != unpacked else names[0]
        else:
            image = paths[0] if len(paths) == 1 else received
            shown = names[0] if len(paths) == 1 else f"{len(paths)} files"
        _check_volume_upload(image, "session image", shown)
        session_id, info = sessions.add_session(image, expiry, uncompress=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info(f"session {session_id} created ({shown})")
    return {"session_id": session_id, "session_info": info.to_json()}


# ---------------------------------------------------------------------------------------------------- weights
def _weights_paths(model: str) -> list:
    """``[pre-trained, fine-tuned]`` weights paths of infer task ``model`` (404 for an unknown one)."""
    infers = getattr(app_instance(), "_infers", None) or {}
    _known("model", model, infers)
    provider = getattr(infers[model], "provider", None)
    paths = list(getattr(provider, "paths", None) or [])
    if not paths:
        raise HTTPException(status_code=404, detail=f"model {model!r} has no weights file")
    return paths


def update_model_checked(
    model: str,
    file: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
):
    """PUT ``/model/{model}``: new weights for ``model``. monailabel copied any bytes over the newest weights file,
    in place (a reader could see half a file; through the test app's symlink it overwrote the shipped weights) and
    for the annotator role. Here: admin only; the upload must be ensam weights (an ``ensam-weights`` artefact, or a
    plain state_dict that fits the current network) or it is 400; it is published as the fine-tuned weights
    (``model/<name>.pt``) with :func:`lib.weights.save_artefact` (one atomic rename; the pre-trained file is never
    written). A plain state_dict takes the meta (network, contract, vocabulary) of the weights it replaces."""
    from lib.engine import load_network  # the app's lib (see the module docstring)
    from lib.weights import load_artefact, read_meta, save_artefact

    paths = _weights_paths(model)
    tmp = _save_upload(file, ".pt")
    try:
        try:
            art = load_artefact(tmp)
        except Exception as e:  # noqa: BLE001 - WeightsError, or whatever torch raises for foreign bytes
            raise HTTPException(status_code=400, detail=f"the upload is not ensam weights: "
                                                        f"{str(e).replace(tmp, file.filename or 'upload')}") from None
        current = next((p for p in reversed(paths) if os.path.exists(p)), None)
        meta = dict(art.meta) if art.layout == "artefact" else {**(read_meta(current) if current else {}),
                                                                **art.meta}
        try:
            load_network(art, meta.get("network") or None)  # the weights must fit their network
        except Exception as e:  # noqa: BLE001 - missing / unexpected keys, shape mismatches
            raise HTTPException(status_code=400, detail=f"the uploaded weights do not fit the network "
                                                        f"{meta.get('network')}: {type(e).__name__}: "
                                                        f"{str(e)[:500]}") from None
        meta["uploaded_as"] = os.path.basename(file.filename or "") or None
        save_artefact(paths[-1], art.state_dict, meta, refiner=art.refiner)  # a refiner is kept (same network)
    finally:
        remove_file(tmp)
    st = os.stat(paths[-1])
    logger.info(f"model {model!r}: new weights uploaded -> {paths[-1]}")
    return {"weights": os.path.basename(paths[-1]), "modified_time": int(st.st_mtime), "size": st.st_size}


def delete_model_checked(model: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    """DELETE ``/model/{model}``: set the fine-tuned weights aside (renamed ``<file>.<time>.deleted``, as monailabel
    does), so the pre-trained ones serve again; admin only. The pre-trained weights are never deleted through the
    API (monailabel moved whichever file was newest: with no fine-tuned weights, the server lost its model)."""
    import datetime

    paths = _weights_paths(model)
    if len(paths) < 2 or not os.path.exists(paths[-1]):
        raise HTTPException(status_code=409, detail=f"model {model!r} has no fine-tuned weights to delete; the "
                                                    f"pre-trained weights are not deleted through the API")
    os.replace(paths[-1], f"{paths[-1]}.{datetime.datetime.now().strftime('%Y%m%d_%H%M%S_%f')}.deleted")
    logger.info(f"model {model!r}: fine-tuned weights set aside; {os.path.basename(paths[0])} serves again")
    return {}


def infer_threaded(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    """POST ``/infer/{model}`` in the thread pool. The image is a datastore id (``?image=``), an uploaded ``file``
    or a ``session_id``; never a path on the server, and ``params`` may not name another one."""
    instance = app_instance()
    _known("infer task", model, getattr(instance, "_infers", None) or {})
    _check_id(image)
    p = _json_object(params, "params")
    if "image" in p and p["image"] != image:
        raise HTTPException(status_code=400, detail=f"'image' in params ({p['image']!r}) differs from ?image= "
                                                    f"({image!r}): give the image once, as ?image=<datastore id>; "
                                                    f"{ID_RULE}")
    if p.get("model", model) != model:
        raise HTTPException(status_code=400, detail=f"'model' in params ({p['model']!r}) differs from the route's "
                                                    f"model {model!r}")
    if "label_tag" in p:
        _check_id(p["label_tag"], "label tag")
    if session_id:
        _check_id(session_id, "session id")
        sessions = instance.sessions()
        if sessions is None:
            raise HTTPException(status_code=406, detail="sessions are not enabled on this server (session_id)")
        if not sessions.get_session(session_id):
            raise HTTPException(status_code=404, detail=f"session {session_id!r} not found (expired?)")
    elif file:
        tmp = _save_upload(file, _upload_suffix(file.filename))
        try:
            _check_volume_upload(tmp, "image", file.filename)
        finally:
            remove_file(tmp)
        file.file.seek(0)
    elif image:
        _datastore_image(image)
    else:
        raise HTTPException(status_code=400, detail="no image: give ?image=<datastore id>, a 'file' upload or a "
                                                    "?session_id=")
    _check_infer_raw_label(label, image, file, session_id)
    if output == ResultType.dicom_seg:
        return infer_as_dicom_seg(background_tasks, model, image, session_id, params, file, label, p)
    try:
        return run_inference(background_tasks, model, image, session_id, params, file, label, output)
    except Exception as e:  # noqa: BLE001 - every error becomes an HTTP answer
        _raise_for(e, f"inference model={model} image={image}")


def infer_as_dicom_seg(background_tasks: BackgroundTasks, model: str, image: str, session_id: str, params: str,
                       file: Optional[UploadFile], label: Optional[UploadFile], p: Dict[str, Any]) -> Response:
    """``output=dicom_seg``: the result as a DICOM SEG on the image's series, written with pydicom-seg by
    ``lib.infers.dicom_seg`` (monailabel 0.8.5 needs dcmqi for it, which an offline server cannot download: 500).
    Segments are named from the request's ``label_info`` if given, else from the result's ``label_names``. The image
    must be a series of the DICOMweb datastore (the SEG references its instances): 400 otherwise; an empty result
    is 422 (a SEG needs a segment)."""
    from monailabel.datastore.dicom import DICOMWebDatastore
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    from lib.infers.dicom_seg import write_dicom_seg  # the app's lib (see the module docstring)

    datastore = app_instance().datastore()
    if file or session_id or not image or not isinstance(datastore, DICOMWebDatastore):
        raise HTTPException(status_code=400, detail="output=dicom_seg needs a DICOM series: ?image=<SeriesInstanceUID>"
                                                    " on a server started on a DICOMweb store (--studies "
                                                    "<url>/dicom-web); for other images use output=image")
    label_info = p.get("label_info")
    if label_info is not None and not (isinstance(label_info, list) and all(isinstance(e, dict) for e in label_info)):
        raise HTTPException(status_code=400, detail="'label_info' must be a list of {\"name\": ..., \"idx\": <value>}")
    try:
        res = run_inference(background_tasks, model, image, session_id, params, file, label, ResultType.all)
    except Exception as e:  # noqa: BLE001
        _raise_for(e, f"inference model={model} image={image}")
    if not isinstance(res, Response):
        raise HTTPException(status_code=500, detail=f"inference model={model} image={image} gave no result image")
    result, mask, name = {}, None, ""
    for part in MultipartDecoder(res.body, res.media_type).parts:
        disposition = part.headers.get(b"Content-Disposition", b"").decode("latin-1")
        if 'name="params"' in disposition:
            result = json.loads(part.content or b"{}")
        elif 'name="image"' in disposition:
            mask, name = part.content, disposition.split('filename="')[-1].rstrip('"')
    fd, mask_path = tempfile.mkstemp(suffix=_upload_suffix(name), prefix="ensam_result_")
    with os.fdopen(fd, "wb") as out:
        out.write(mask or b"")
    try:
        series_dir = os.path.realpath(os.path.join(datastore._datastore.image_path(), image))
        seg = write_dicom_seg(series_dir, mask_path, label_info, result.get("label_names"), series_description=model)
    except Exception as e:  # noqa: BLE001
        _raise_for(e, f"DICOM SEG of the result of model={model} image={image}")
    finally:
        remove_file(mask_path)
    if not seg:
        raise HTTPException(status_code=422, detail="the result is empty (no voxel labelled): a DICOM SEG needs at "
                                                    "least one segment; output=json gives the result's details")
    background_tasks.add_task(remove_file, seg)
    return FileResponse(seg, media_type="application/dicom", filename=f"{model}_{image}.dcm")


async def next_sample_checked(
    strategy: str,
    params: Optional[dict] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    """POST ``/activelearning/{strategy}``: an unknown strategy is 404 naming the known ones (monailabel: 500).
    ``async`` like monailabel's route (and the two below): requests of these kinds stay one at a time, as the
    strategies' "recently served" bookkeeping and the "task already running" checks expect."""
    from monailabel.endpoints.activelearning import sample

    _known("strategy", strategy, getattr(app_instance(), "_strategies", None) or {})
    try:
        return sample(strategy, params, user.username)
    except Exception as e:  # noqa: BLE001
        _raise_for(e, f"next sample ({strategy})")


async def scoring_checked(
    method: str,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    """POST ``/scoring/{method}``: an unknown method is 404 naming the known ones, ``images`` must be datastore ids
    (monailabel starts the task anyway and the error only shows in its log)."""
    from monailabel.endpoints.scoring import run_method

    _known("scoring method", method, getattr(app_instance(), "_scoring_methods", None) or {})
    images = (params or {}).get("images")
    if images not in (None, "", "all"):
        _check_image_ids(images)
    try:
        return run_method(method, params, run_sync)
    except Exception as e:  # noqa: BLE001
        _raise_for(e, f"scoring ({method})")


async def batch_infer_checked(
    model: str,
    images: Optional[BatchInferImageType] = BatchInferImageType.IMAGES_ALL,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
):
    """POST ``/batch/infer/{model}``: the model, ``images``, ``label_tag`` and the prompt ``manifest`` (inline only,
    every entry within the per-request limits) are checked before the batch task starts."""
    from monailabel.endpoints.batch_infer import run

    from lib.infers.batch import load_manifest  # the app's lib (see the module docstring)

    _known("infer task", model, getattr(app_instance(), "_infers", None) or {})
    body = dict(params or {})
    if "label_tag" in body:
        _check_id(body["label_tag"], "label tag")
    chosen = body.get("images")
    if isinstance(chosen, str) and chosen not in [t.value for t in BatchInferImageType]:
        raise HTTPException(status_code=400, detail=f"'images' must be one of {[t.value for t in BatchInferImageType]} "
                                                    f"or a list of datastore ids, got {chosen!r}")
    if isinstance(chosen, (list, tuple)) or (chosen is not None and not isinstance(chosen, str)):
        _check_image_ids(chosen)
    manifest = body.get("manifest")
    if isinstance(manifest, str) and manifest.strip() and not manifest.strip().startswith(("{", "[")):
        raise HTTPException(status_code=400, detail="the manifest must be given inline (a JSON object or list), "
                                                    "not as a file path on the server")
    if isinstance(manifest, str) and manifest.strip():  # JSON given as text: the same bounds as any JSON
        manifest = _json_value(manifest.strip(), "manifest")
    try:
        checked = load_manifest(manifest)
    except Exception as e:  # noqa: BLE001
        _raise_for(e, f"batch inference ({model}): manifest")
    if checked:
        _check_image_ids(list(checked), "manifest")
    try:
        return run(model, images, params, run_sync)
    except Exception as e:  # noqa: BLE001
        _raise_for(e, f"batch inference ({model})")


def train_checked(
    model: str,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    enqueue: Optional[bool] = False,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
):
    """POST ``/train/{model}``: monailabel starts the training process first and only its log shows a bad request.
    Here the request is checked by the train task itself (``parse_request``) before anything starts: an unknown
    model is 404, a bad parameter 400 with the reason; then monailabel's own handler runs it."""
    from monailabel.endpoints.train import run_model

    trainers = getattr(app_instance(), "_trainers", None) or {}
    if model not in trainers:
        raise HTTPException(status_code=404, detail=f"no train task {model!r}; known: {sorted(trainers)}")
    _check_train_request(model, trainers[model], params)
    return _task_snapshot(run_model(model, params, run_sync, enqueue))


def _check_train_request(model: str, task: Any, params: Optional[dict]) -> None:
    """The train task's own request check (``parse_request``; its ValueError is a 400), after the JSON bounds (the
    body was checked by ``RequestGuard``; this also covers a body FastAPI read another way)."""
    from lib.io.json_bounds import json_problem  # the app's lib (see the module docstring)

    problem = json_problem(params, "the train request")
    if problem:
        raise HTTPException(status_code=400, detail=problem)
    check = getattr(task, "parse_request", None)
    if callable(check):
        try:
            check(params or {})
        except ValueError as e:  # parse_request is the train task's request validator: its ValueError is a 400
            logger.warning(f"rejected request (400): train {model}: {e}")
            raise HTTPException(status_code=400, detail=str(e)) from None
        except Exception as e:  # noqa: BLE001
            _raise_for(e, f"train request check ({model})")


def _task_snapshot(task: Any) -> Any:
    """A copy of a background task's record as monailabel returns it: its thread updates the record (status, log
    lines, the request's ``gpus``) while the answer is written, which failed ("dictionary changed size during
    iteration") for a large request."""
    if not isinstance(task, dict):
        return task
    out = dict(task)
    if isinstance(out.get("request"), dict):
        out["request"] = dict(out["request"])
    if out.get("details") is not None and not isinstance(out["details"], (str, list)):
        out["details"] = list(out["details"])
    return out


def train_all_checked(
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
):
    """POST ``/train/`` (monailabel's deprecated "run every train task", ``params`` keyed by model name): each
    task's request (monailabel merges ``params`` and ``params[model]``) is checked as in ``train_checked`` before
    any starts."""
    from monailabel.endpoints.train import run

    trainers = getattr(app_instance(), "_trainers", None) or {}
    for model, task in trainers.items():
        sub = (params or {}).get(model)
        if sub is not None and not isinstance(sub, dict):
            raise HTTPException(status_code=400, detail=f"params.{model} must be a JSON object (the request of "
                                                        f"train task {model!r}), got {type(sub).__name__}")
        merged = {k: v for k, v in (params or {}).items() if k not in trainers}
        _check_train_request(model, task, {**merged, **(sub or {})})
    result = run(params, run_sync)
    return {k: dict(v, result=_task_snapshot(v.get("result"))) if isinstance(v, dict) else v
            for k, v in result.items()}


_API = settings.MONAI_LABEL_API_STR
_routes = [
    APIRoute(f"{_API}/session/", create_session_checked, methods=["PUT"],
             summary=f"{RBAC_USER}Create new session with Image (ensam: names, archive members and the volume "
                     f"checked)", tags=["Session"]),
    APIRoute(f"{_API}/train/", train_all_checked, methods=["POST"], include_in_schema=False),
    APIRoute(f"{_API}/train/{{model}}", train_checked, methods=["POST"],
             summary=f"{RBAC_USER}Run Training Task for specific model (ensam: request checked first)",
             tags=["Train"]),
    APIRoute(
        f"{_API}/infer/{{model}}",
        infer_threaded,
        methods=["POST"],
        summary=f"{RBAC_USER}Run Inference for supported model (ensam: thread pool, non-blocking, checked ids)",
        tags=["Infer"],
    ),
    APIRoute(f"{_API}/batch/infer/{{model}}", batch_infer_checked, methods=["POST"],
             summary="Run Batch Inference Task (ensam: model, images and manifest checked first)", tags=["Infer"]),
    APIRoute(f"{_API}/scoring/{{method}}", scoring_checked, methods=["POST"],
             summary="Run Scoring Task for specific method (ensam: method and images checked first)",
             tags=["Scoring"]),
    APIRoute(f"{_API}/activelearning/{{strategy}}", next_sample_checked, methods=["POST"],
             summary=f"{RBAC_USER}Run Active Learning strategy to get next sample (ensam: 404 for an unknown one)",
             tags=["ActiveLearning"]),
    APIRoute(f"{_API}/datastore/image", add_image_checked, methods=["PUT"],
             summary=f"{RBAC_ANNOTATOR}Upload new Image (ensam: only a readable 3D volume)", tags=["Datastore"]),
    APIRoute(f"{_API}/datastore/", add_image_checked, methods=["PUT"], include_in_schema=False),
    APIRoute(f"{_API}/datastore/image", delete_image_checked, methods=["DELETE"],
             summary=f"{RBAC_ADMIN}Remove Image and corresponding labels (ensam: every file of the id, under its "
                     f"lock)", tags=["Datastore"]),
    APIRoute(f"{_API}/datastore/", delete_image_checked, methods=["DELETE"], include_in_schema=False),
    APIRoute(f"{_API}/datastore/label", save_label_checked, methods=["PUT"],
             summary=f"{RBAC_ANNOTATOR}Save Finished Label (ensam: a 3D volume on its image's grid)",
             tags=["Datastore"]),
    APIRoute(f"{_API}/model/{{model}}", update_model_checked, methods=["PUT"],
             summary=f"{RBAC_ADMIN}Upload new model weights (ensam: checked, published atomically as the "
                     f"fine-tuned weights)", tags=["Model"]),
    APIRoute(f"{_API}/model/{{model}}", delete_model_checked, methods=["DELETE"],
             summary=f"{RBAC_ADMIN}Set the fine-tuned weights aside (ensam: never the pre-trained ones)",
             tags=["Model"]),
    APIRoute(f"{_API}/datastore/image/info", update_image_info_checked, methods=["PUT"],
             summary=f"{RBAC_ANNOTATOR}Update Image Info (ensam: info checked)", tags=["Datastore"]),
    APIRoute(f"{_API}/datastore/label/info", update_label_info_checked, methods=["PUT"],
             summary=f"{RBAC_ANNOTATOR}Update Label Info (ensam: info checked)", tags=["Datastore"]),
    APIRoute(f"{_API}/datastore/updatelabelinfo", update_label_info_checked, methods=["PUT"],
             include_in_schema=False),
    APIRoute(f"{_API}/datastore/dataset", download_dataset_checked, methods=["GET"],
             summary=f"{RBAC_ANNOTATOR}Download full dataset as ZIP archive (ensam: 404 when empty)",
             tags=["Datastore"]),
    APIRoute(f"{_API}/logs/gpu", gpu_info_checked, methods=["GET"],
             summary=f"{RBAC_ADMIN}Get GPU Info (nvidia-smi; ensam: 404 without it)", tags=["Others"]),
    APIRoute(f"{_API}/infer/wsi_v2/{{model}}", wsi_infer_unsupported, methods=["POST"],
             summary=f"{RBAC_USER}Whole-slide inference (ensam: not supported, 400)", tags=["Infer"]),
    APIRoute(f"{_API}/session/{{session_id}}", get_session_checked, methods=["GET"],
             summary=f"{RBAC_USER}Get Session ID (ensam: 406 when sessions are off)", tags=["Session"]),
    APIRoute(f"{_API}/session/{{session_id}}", remove_session_checked, methods=["DELETE"],
             summary=f"{RBAC_USER}Delete Session (ensam: 406 when sessions are off)", tags=["Session"]),
    APIRoute(f"{_API}/ohif/{{path:path}}", ohif_file, methods=["GET"], include_in_schema=False),
]
# every method under /proxy/dicom/ (monailabel's proxy forwarded any path, POST included, with the PACS credentials)
_routes.append(APIRoute(f"{_API}/proxy/dicom/{{path:path}}", dicomweb_proxy,
                        methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False))
put_routes_first(app, _routes)  # they shadow monailabel's routes for the same paths
add_middleware_once(app, Middleware(RequestGuard))
put_exception_handler(app, MONAILabelException, monailabel_exception_handler)
