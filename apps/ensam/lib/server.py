"""The uvicorn app for ensam: monailabel's FastAPI app with ensam's routes in front of monailabel's for the same paths.

Start it with ``monailabel start_server ... --uvicorn_app lib.server:app`` and ``<repo>/apps/ensam`` on PYTHONPATH
(the Makefile's ``serve`` target does both). This module only wires; the HTTP layer lives in ``lib/http/``:

* ``routes.py``: the thread-pool ``POST /infer/{model}`` (monailabel's is an ``async`` route that runs the inference
  synchronously and froze the whole server), checked train / batch / scoring / active-learning / weights / datastore
  routes (bad requests are 4xx with their reason before any task starts; monailabel answered 500 or started them);
* ``uploads.py``: image, label and session uploads through the same volume checks (``lib.io.imageio``), session
  archives unpacked member by member (``lib.io.archive``);
* ``rules.py``: ids and tags (plain names, at most 200 UTF-8 bytes), the per-id lock of saves / uploads / deletes,
  bounded JSON (``lib.io.json_bounds``: 32 levels, finite numbers), known task names;
* ``guard.py`` + ``limits.py``: the ASGI request guard (the id rule on the query, body sizes: 413, JSON bodies
  checked before any route parses them);
* ``errors.py``: which exceptions are the client's (4xx, one log line) and which are the server's (500 with the
  traceback); ``auth.py``: the bearer-token check; ``proxy.py``: the DICOMweb proxy confined to the viewer's reads.

Every reach into monailabel's internals is in ``lib.monailabel_patches`` (with the version check).

Loading rule: monailabel's app loader unloads every ``lib.*`` module before it executes ``main.py``, so this module
and ``lib.http`` are imported once by uvicorn and then dropped from ``sys.modules`` while their objects stay alive.
``lib.http`` therefore imports no other ``lib`` module at import time (the handlers import the few helpers they need
when they run, and so get the app's own modules), and errors are recognised by module and class name, never by class
identity (the classes are re-created by the loader).
"""

from __future__ import annotations

import logging

from fastapi.routing import APIRoute
from starlette.middleware import Middleware
from monailabel.app import app
from monailabel.config import RBAC_ADMIN, RBAC_ANNOTATOR, RBAC_USER, settings
from monailabel.interfaces.exception import MONAILabelException

# every monailabel internal that ensam patches is reached from lib.monailabel_patches (stateless: safe to import here)
from lib.http.auth import ASYMMETRIC_ALGORITHMS, make_current_user, token_user  # noqa: F401 (re-exported)
from lib.http.errors import http_error_for, monailabel_exception_handler
from lib.http.guard import RequestGuard
from lib.http.proxy import dicomweb_proxy
from lib.http.routes import (batch_infer_checked, delete_image_checked, delete_model_checked, download_dataset_checked,
                             gpu_info_checked, infer_threaded, next_sample_checked, scoring_checked,
                             train_all_checked, train_checked, update_image_info_checked, update_label_info_checked,
                             update_model_checked, wsi_infer_unsupported)
from lib.http.rules import id_problem
from lib.http.uploads import (add_image_checked, create_session_checked, get_session_checked, remove_session_checked,
                              save_label_checked)
from lib.monailabel_patches import (OHIF_DIR, add_middleware_once, check_version, install_token_check, ohif_file,
                                    put_exception_handler, put_routes_first)

logger = logging.getLogger("ensam.server")

__all__ = ["app", "OHIF_DIR", "RequestGuard", "add_image_checked", "batch_infer_checked", "delete_model_checked",
           "dicomweb_proxy", "http_error_for", "id_problem", "next_sample_checked", "ohif_file",
           "save_label_checked", "scoring_checked", "train_checked", "update_model_checked", "delete_image_checked",
           "train_all_checked", "create_session_checked", "ROUTES"]

check_version()  # a warning naming the monailabel version the patches were written for, when another is installed


# ---------------------------------------------------------------------------------------------------- auth
# ensam's token check (lib/http/auth.py): asymmetric signatures only, realm keys cached with a bounded refresh,
# audience / issuer when set, run in the thread pool (monailabel 0.8.5 refused every token with PyJWT 2).
install_token_check(app, token_user, make_current_user())


# ---------------------------------------------------------------------------------------------------- routes
_API = settings.MONAI_LABEL_API_STR
ROUTES = _routes = [
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
put_routes_first(app, ROUTES)  # they shadow monailabel's routes for the same paths
add_middleware_once(app, Middleware(RequestGuard))
put_exception_handler(app, MONAILabelException, monailabel_exception_handler)
