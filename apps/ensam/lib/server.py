"""The uvicorn app for ensam: monailabel's FastAPI app with a NON-BLOCKING ``POST /infer/{model}``.

monailabel 0.8.5 declares ``/infer/{model}`` as an ``async`` route that runs the inference synchronously, so one
inference freezes the whole server (``/info`` included). Here a plain ``def`` route with the same signature is put
first in the router: FastAPI runs it in its thread pool, the event loop stays free, and the engine provider's
per-device semaphore keeps concurrent inferences safe. The route also turns bad requests into 4xx answers with a
clear message (monailabel itself answers 500 to any exception).

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
from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from monailabel.app import app
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.utils.app import app_instance

logger = logging.getLogger("ensam.server")

__all__ = ["app", "http_error_for", "ohif_file"]

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


_routes = [
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
for _r in reversed(_routes):  # first in the router: they shadow monailabel's routes for the same paths
    if not any(getattr(r, "endpoint", None) is _r.endpoint for r in app.router.routes):
        app.router.routes.insert(0, _r)
