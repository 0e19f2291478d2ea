"""The uvicorn app for ensam: monailabel's FastAPI app with a NON-BLOCKING ``POST /infer/{model}``.

monailabel 0.8.5 declares ``/infer/{model}`` as an ``async`` route that runs the inference synchronously, so one
inference freezes the whole server (``/info`` included). Here a plain ``def`` route with the same signature is put
first in the router: FastAPI runs it in its thread pool, the event loop stays free, and the engine provider's
per-device semaphore keeps concurrent inferences safe. The route also turns bad requests into 4xx answers with a
clear message (monailabel itself answers 500 to any exception).

``POST /train/{model}`` is checked by the train task before monailabel starts the training process (monailabel
accepts anything and the error only shows in the training log): a bad parameter is 400 with the reason.

It also replaces the GET side of monailabel's DICOMweb proxy (``/proxy/dicom/{wado,qido}/...``, what OHIF reads
through): monailabel's proxy drops the client's ``Accept`` header and query string and blocks the event loop.
OHIF asks for frames with ``transfer-syntax=*`` (it decodes JPEG 2000 etc. itself); without that header Orthanc
decodes each frame with its GDCM plugin, and Orthanc 1.10.1 + orthanc-gdcm 1.5 (Debian 12) crashes (segfault in
libgdcmMSFF) after a few JPEG 2000 frames: the viewer then loses the rest of the series and Orthanc is gone.

Start it with ``monailabel start_server ... --uvicorn_app lib.server:app`` and ``<repo>/apps/ensam`` on
PYTHONPATH (the Makefile's ``serve`` target does both).

Loading rule: monailabel's app loader unloads every ``lib.*`` module before it executes ``main.py``, so this module
is imported once by uvicorn and then dropped from ``sys.modules`` while its objects stay alive. It therefore
imports nothing from ``lib``: errors are recognised by their ``status_code`` attribute or class name, never by
class identity (the classes are re-created by the loader).
"""

from __future__ import annotations

import logging
import mimetypes
import os
from typing import Optional

import monailabel.endpoints
import requests
from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from monailabel.app import app
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.proxy import proxy_dicom
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.utils.app import app_instance

logger = logging.getLogger("ensam.server")

__all__ = ["app", "dicomweb_qido", "dicomweb_wado", "http_error_for", "ohif_file", "train_checked"]

OHIF_DIR = os.path.join(os.path.dirname(os.path.realpath(monailabel.endpoints.__file__)), "static", "ohif")
mimetypes.add_type("application/wasm", ".wasm")


def http_error_for(exc: BaseException) -> Optional[HTTPException]:
    """The 4xx answer for a request error, or None for a server fault (-> 500)."""
    if isinstance(exc, HTTPException):
        return exc
    e: Optional[BaseException] = exc
    seen = set()
    while e is not None and id(e) not in seen:  # explicit markers may sit on a wrapped cause
        seen.add(id(e))
        code = getattr(e, "status_code", None)
        if isinstance(code, int) and 400 <= code < 500:
            return HTTPException(status_code=code, detail=str(e))
        if "PromptError" in {c.__name__ for c in type(e).__mro__}:
            return HTTPException(status_code=422, detail=str(e))
        e = e.__cause__
    if isinstance(exc, MONAILabelException):
        if exc.error == MONAILabelError.INVALID_INPUT:
            code = 404 if "no model" in str(exc.msg).lower() else 400
            return HTTPException(status_code=code, detail=exc.msg)
        return None
    if isinstance(exc, FileNotFoundError):
        return HTTPException(status_code=404, detail=str(exc))
    if isinstance(exc, ValueError):
        return HTTPException(status_code=400, detail=str(exc))
    return None


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
    try:
        if image and not file and not session_id and not os.path.exists(image):
            uri = app_instance().datastore().get_image_uri(image)
            if not uri or not os.path.exists(uri):
                raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore")
        return run_inference(background_tasks, model, image, session_id, params, file, label, output)
    except HTTPException:
        raise
    except Exception as e:  # noqa: BLE001 - every error becomes an HTTP answer
        err = http_error_for(e)
        if err is None:
            logger.exception(f"inference failed: model={model} image={image}")
            raise HTTPException(status_code=500, detail=f"inference failed: {type(e).__name__}: {e}") from e
        logger.warning(f"rejected infer request ({err.status_code}): model={model} image={image}: {err.detail}")
        raise err from None


def ohif_file(path: str = "", user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    """The bundled OHIF viewer's files. monailabel 0.8.5 joins nested paths with ``os.pathsep`` (':'), so every
    ``/ohif/assets/...`` file came back as index.html; this serves them (index.html for the app's own routes)."""
    base = os.path.realpath(OHIF_DIR)
    file = os.path.realpath(os.path.join(base, path)) if path else ""
    if not file.startswith(base + os.sep) or not os.path.isfile(file):
        file = os.path.join(base, "index.html")
    if not os.path.isfile(file):
        raise HTTPException(status_code=404, detail="OHIF is not bundled with this monailabel installation")
    media_type = mimetypes.guess_type(file, strict=False)[0] or "application/octet-stream"
    return FileResponse(file, media_type=media_type)


_FORWARDED_REQUEST_HEADERS = ("accept",)
_RETURNED_HEADERS = ("content-type", "content-location", "warning")


def _dicomweb_get(op: str, path: str, request: Request) -> Response:
    studies = (settings.MONAI_LABEL_STUDIES or "").rstrip("/")
    if not studies.startswith(("http://", "https://")):
        raise HTTPException(status_code=404, detail="the datastore is not a DICOMweb server: nothing to proxy")
    prefix = settings.MONAI_LABEL_QIDO_PREFIX if op == "qido" else settings.MONAI_LABEL_WADO_PREFIX
    if op == "qido" and path.endswith("metadata"):  # as monailabel's proxy: some OHIF versions ask QIDO for it
        prefix = settings.MONAI_LABEL_WADO_PREFIX
    url = "/".join(x.strip("/") for x in (studies, prefix or "", path) if x and x.strip("/"))
    headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_REQUEST_HEADERS}
    user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
    try:
        r = requests.get(url, params=list(request.query_params.multi_items()), headers=headers,
                         auth=(user, password) if user and password else None,
                         timeout=settings.MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT)
    except requests.RequestException as e:
        logger.warning(f"DICOMweb proxy: {url}: {type(e).__name__}: {e}")
        raise HTTPException(status_code=502, detail=f"the DICOMweb server did not answer: {type(e).__name__}") from e
    out = {k: v for k, v in r.headers.items() if k.lower() in _RETURNED_HEADERS}
    return Response(content=r.content, status_code=r.status_code, headers=out)


async def _proxy(op: str, path: str, request: Request) -> Response:
    if "googleapis.com" in (settings.MONAI_LABEL_STUDIES or ""):  # token auth: monailabel's own proxy
        return await proxy_dicom(request, op, path)
    return await run_in_threadpool(_dicomweb_get, op, path, request)


async def dicomweb_wado(request: Request, path: str,
                        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    """GET ``/proxy/dicom/wado/<path>`` -> ``<studies>/<wado prefix>/<path>?<query>`` with the client's ``Accept``
    header, off the event loop. POST (STOW) stays with monailabel's proxy."""
    return await _proxy("wado", path, request)


async def dicomweb_qido(request: Request, path: str,
                        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    """GET ``/proxy/dicom/qido/<path>``: as ``dicomweb_wado``."""
    return await _proxy("qido", path, request)


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
    check = getattr(trainers[model], "parse_request", None)
    if callable(check):
        try:
            check(params or {})
        except Exception as e:
            err = http_error_for(e)
            if err is None:
                raise
            raise err from None
    return run_model(model, params, run_sync, enqueue)


_routes = [
    APIRoute(f"{settings.MONAI_LABEL_API_STR}/train/{{model}}", train_checked, methods=["POST"],
             summary=f"{RBAC_USER}Run Training Task for specific model (ensam: request checked first)",
             tags=["Train"]),
    APIRoute(
        f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}",
        infer_threaded,
        methods=["POST"],
        summary=f"{RBAC_USER}Run Inference for supported model (ensam: thread pool, non-blocking)",
        tags=["Infer"],
    ),
    APIRoute(f"{settings.MONAI_LABEL_API_STR}/ohif/{{path:path}}", ohif_file, methods=["GET"],
             include_in_schema=False),
]
_routes += [APIRoute(f"{settings.MONAI_LABEL_API_STR}/proxy/dicom/{op}/{{path:path}}", endpoint, methods=["GET"],
                     include_in_schema=False) for op, endpoint in (("wado", dicomweb_wado), ("qido", dicomweb_qido))]
for _r in reversed(_routes):  # first in the router: they shadow monailabel's routes for the same paths
    if not any(getattr(r, "endpoint", None) is _r.endpoint for r in app.router.routes):
        app.router.routes.insert(0, _r)
