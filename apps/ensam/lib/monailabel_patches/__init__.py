"""Every place where ensam reaches into monailabel's internals, in ONE package: this module and
:mod:`.atomic_datastore` (the local datastore subclass, patch 5), written for monailabel 0.8.5.

monailabel has no plug-in points for these; each one relies on a private name or on the shape of its FastAPI app,
so a new monailabel may break them. :func:`check_version` (called when ``lib.server`` and ``main`` are imported)
warns, naming :data:`WRITTEN_FOR`, when the installed monailabel is another version: read this list then.

What is patched, and why:

1. Routes put FIRST in monailabel's router (:func:`put_routes_first`, from ``lib.server``): they shadow
   monailabel's routes for the same paths. ``POST /infer/{model}`` (monailabel's is ``async`` and runs the
   inference on the event loop: one click froze the whole server), train / batch / scoring / active learning /
   datastore / model / session routes (requests checked first: 4xx with the reason instead of a 500 or a silently
   failed job), the DICOMweb proxy GETs (monailabel's drops the client's ``Accept`` header and query string, and
   Orthanc + GDCM then crashes transcoding JPEG 2000) and the bundled OHIF files (below).
2. Request guard middleware and the ``MONAILabelException`` handler added to monailabel's app
   (:func:`add_middleware_once`, :func:`put_exception_handler`): path-like ids and oversized bodies are refused
   before any route runs; monailabel's own errors become 4xx JSON.
3. OHIF file serving (:func:`ohif_file`, :data:`OHIF_DIR`, from monailabel's package folder): monailabel 0.8.5
   joins nested paths with ``os.pathsep`` (':'), so every ``/ohif/assets/...`` file came back as index.html. Served
   by Starlette's ``StaticFiles`` (index.html for the viewer's own routes), behind monailabel's user role.
4. The token check (:func:`install_token_check`): ``monailabel.endpoints.user.auth.from_token`` replaced by
   ``lib.http.auth.token_user`` (asymmetric algorithms only, realm ``public_key`` or JWKS cached, expiry required,
   audience / issuer when set), and monailabel's ``async`` ``get_current_user`` dependency overridden on the app by
   a plain ``def`` one (run in the thread pool: a slow identity realm never stalls the event loop). Upstream:
   monailabel's dependency should be a ``def`` and its key fetch cached.
5. The local datastore class (:func:`local_datastore`): :mod:`.atomic_datastore`'s ``AtomicLocalDatastore`` (in
   this package: it subclasses monailabel's and lives on its private names) instead of
   ``LocalDatastore`` (it overrides the private ``_update_datastore_file`` and the copy steps of ``add_image`` /
   ``save_label``: a kill never leaves a truncated label or index), and :func:`reload_local_datastore` (the
   private ``_init_from_datastore_file``, so that a process does not write back a stale index another process
   rewrote). It also overrides ``_init_from_datastore_file`` itself (an index entry pydantic cannot read is
   skipped and logged instead of failing every start) and ``remove_image`` (every file of the id and its labels,
   under the datastore's file lock), and reads the private ``_lock_file``, ``_extensions``, ``_to_id``,
   ``_filename`` and ``_datastore`` (issue 25).
6. The DICOMweb datastore (:func:`patch_dicomweb_datastore`, from :class:`AppPatches`, which overrides the private
   ``MONAILabelApp._init_dicomweb_datastore`` for ``main.EnsamApp``):
   the created object's class swapped to ``main.DICOMwebDatastoreWithPydicomSeg`` (same object and state: a
   second datastore would start a second file watcher; saved ``final`` labels become DICOM SEG with pydicom-seg
   when dcmqi is missing, and the cached ``get_labeled_images`` is cleared), and its private ``_client``'s
   ``retrieve_series`` asked for the stored transfer syntax (:func:`retrieve_series_as_stored`).
7. ``MONAILabelApp._download_dcmqi_tools`` (private, overridden by :class:`AppPatches`) may fail offline without
   stopping the app: ensam writes DICOM SEG with pydicom-seg and never needs dcmqi.
8. Image ids at inference (:func:`infer_by_datastore_id`, from ``main.EnsamApp.infer``): monailabel's
   ``MONAILabelApp.infer`` tests ``os.path.exists(image_id)`` first, relative to the server's working directory,
   and reads that file instead of the datastore's image (an image stored as ``Makefile`` or ``apps`` was a 500,
   and any file there could be read). ensam resolves an id through the datastore itself and hands monailabel the
   image's path; the ``save_label`` step monailabel then skips (it does for paths) is done here.
9. Private names that ensam's routes (``lib.http``) read, each behind one function here: the app's task tables
   ``MONAILabelApp._infers`` / ``_trainers`` / ``_strategies`` / ``_scoring_methods`` (:func:`app_tasks`: an
   unknown name is a 404 listing the known ones before anything runs; monailabel has no public lookup, only
   ``info()``, which builds every task's info) and the DICOMweb datastore's local cache
   ``DICOMWebDatastore._datastore`` (:func:`dicomweb_series_folder`: the folder of a downloaded series, which a DICOM
   SEG references). Upstream: ``MONAILabelApp`` could expose its task tables, ``DICOMWebDatastore`` the series path.
   ``main.EnsamApp`` reads the same task tables through :func:`app_tasks`, the DICOMweb datastore's cache folder
   through :func:`dicomweb_series_folder` and its client ``DICOMWebDatastore._client`` through
   :func:`dicomweb_client_of`, its own datastore ``MONAILabelApp._datastore`` through :func:`app_datastore`, and
   ``MONAILabelApp._auto_update_scoring`` (the start-up scoring that
   ``on_init_complete`` runs) through :func:`startup_scoring_held`. Upstream: a setting for when start-up scoring
   runs.

Loading rule: monailabel's app loader drops every ``lib.*`` module before it runs ``main.py`` (see ``lib.server``);
this package holds no state and no class whose identity is compared (:class:`AppPatches` is only inherited,
``AtomicLocalDatastore`` only instantiated), so the two copies that then exist (the one ``lib.server`` imported, the
one ``main`` imports) do the same thing.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
from typing import Any, Callable, Iterable

import monailabel
import monailabel.endpoints
from fastapi import Depends, HTTPException, Request
from fastapi.responses import Response
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

logger = logging.getLogger("ensam.monailabel_patches")

WRITTEN_FOR = "0.8.5"

__all__ = ["WRITTEN_FOR", "check_version", "put_routes_first", "add_middleware_once", "put_exception_handler",
           "OHIF_DIR", "ohif_file", "install_token_check", "local_datastore", "reload_local_datastore",
           "patch_dicomweb_datastore", "retrieve_series_as_stored", "AS_STORED", "AppPatches",
           "infer_by_datastore_id", "app_tasks", "dicomweb_series_folder", "startup_scoring_held",
           "dicomweb_client_of", "app_datastore"]


def check_version(installed: str = "") -> bool:
    """True when the installed monailabel is the version these patches were written for; otherwise a warning that
    names both versions and this module (the patches still run: they may or may not fit)."""
    installed = installed or str(getattr(monailabel, "__version__", "unknown"))
    if installed.split("+")[0] == WRITTEN_FOR:
        return True
    logger.warning(f"ensam patches monailabel internals written for monailabel {WRITTEN_FOR}, but monailabel "
                   f"{installed} is installed: check every patch listed in lib/monailabel_patches/__init__.py "
                   f"(routes, token check, datastores, OHIF files) before relying on this server")
    return False


# ---------------------------------------------------------------------------------------------- 1, 2: the app
def put_routes_first(app, routes: Iterable[Any]) -> None:
    """Insert ``routes`` at the head of ``app.router.routes`` in their order (once: a route with the same endpoint
    and path already there is not added again), so they shadow monailabel's routes for the same paths."""
    for r in reversed(list(routes)):
        if not any(getattr(x, "endpoint", None) is r.endpoint and getattr(x, "path", None) == r.path
                   for x in app.router.routes):
            app.router.routes.insert(0, r)


def add_middleware_once(app, middleware) -> None:
    """Append a ``starlette.middleware.Middleware`` to ``app.user_middleware`` unless one of its class is there
    (after CORS in the list = inside it)."""
    if not any(m.cls is middleware.cls for m in app.user_middleware):
        app.user_middleware.append(middleware)


def put_exception_handler(app, exc_class, handler: Callable) -> None:
    app.add_exception_handler(exc_class, handler)


# ---------------------------------------------------------------------------------------------- 3: OHIF files
OHIF_DIR = os.path.join(os.path.dirname(os.path.realpath(monailabel.endpoints.__file__)), "static", "ohif")
mimetypes.add_type("application/wasm", ".wasm")


class _OhifFiles(StaticFiles):
    """Starlette's static files (path safety, media types, ETag / 304) for the bundled OHIF, with index.html for
    every path that is not one of its files (the viewer's own routes)."""

    async def get_response(self, path: str, scope) -> Response:
        try:
            return await super().get_response(path, scope)
        except StarletteHTTPException as e:
            if e.status_code != 404:
                raise
        try:
            return await super().get_response("index.html", scope)
        except StarletteHTTPException as e:
            if e.status_code != 404:
                raise
        raise HTTPException(status_code=404, detail="OHIF is not bundled with this monailabel installation")


_OHIF_FILES = _OhifFiles(directory=OHIF_DIR, check_dir=False)


async def ohif_file(request: Request, path: str = "",
                    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> Response:
    """The bundled OHIF viewer's files. monailabel 0.8.5 joins nested paths with ``os.pathsep`` (':'), so every
    ``/ohif/assets/...`` file came back as index.html; this serves them (index.html for the app's own routes)."""
    return await _OHIF_FILES.get_response(os.path.normpath(os.path.join(*(path or "index.html").split("/"))),
                                          request.scope)


# ---------------------------------------------------------------------------------------------- 4: token check
def install_token_check(app, token_user: Callable, current_user: Callable) -> None:
    """monailabel's bearer-token check (``monailabel.endpoints.user.auth.from_token``, read by its ``get_current_user``
    at each request) replaced by ``token_user`` (same contract: token -> ``User``, ``jwt.InvalidTokenError``), and
    its ``async`` dependency ``get_current_user`` (which every ``RBAC`` role check depends on) overridden on ``app``
    by ``current_user`` (a plain ``def``, run in FastAPI's thread pool)."""
    import monailabel.endpoints.user.auth as ml_auth

    ml_auth.from_token = token_user
    app.dependency_overrides[ml_auth.get_current_user] = current_user


# ---------------------------------------------------------------------------------------------- 5: local datastore
def local_datastore(studies: str, read_only: bool = False):
    """:class:`lib.monailabel_patches.atomic_datastore.AtomicLocalDatastore` for a local studies folder, with
    monailabel's datastore settings (the server's); ``read_only``: read only, no file watcher (a batch job's or a
    training plan's view of a datastore the server owns)."""
    from .atomic_datastore import AtomicLocalDatastore

    if read_only:
        return AtomicLocalDatastore(studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False,
                                    read_only=True)
    return AtomicLocalDatastore(studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)


def reload_local_datastore(ds) -> None:
    """Re-read a local datastore's index if another process rewrote it (cheap: one stat)."""
    from monailabel.datastore.local import LocalDatastore

    reload = getattr(ds, "_init_from_datastore_file", None)
    if isinstance(ds, LocalDatastore) and callable(reload):
        reload()


# ---------------------------------------------------------------------------------------------- 6, 7: DICOMweb
AS_STORED = (("application/dicom", "*"),)


def retrieve_series_as_stored(client) -> None:
    """Make ``client.retrieve_series`` ask for the series in its stored transfer syntax.

    dicomweb-client asks for uncompressed DICOM by default, so the PACS has to transcode. Orthanc 1.10.1 with
    orthanc-gdcm 1.5 (Debian 12) crashes while transcoding JPEG 2000 frames (a segfault in GDCM, intermittent,
    seen in test runs). monailabel reads the downloaded series with SimpleITK, whose GDCM decodes every common
    compression, so the server never needs to transcode."""
    original = client.retrieve_series

    def retrieve_series(study_instance_uid, series_instance_uid, media_types=None, **kwargs):
        return original(study_instance_uid, series_instance_uid, media_types=media_types or AS_STORED, **kwargs)

    client.retrieve_series = retrieve_series


def patch_dicomweb_datastore(ds, cls):
    """monailabel's DICOMweb datastore ``ds`` becomes an instance of its subclass ``cls`` (same object and state, one
    overridden method; re-creating the datastore would start a second file watcher on its cache folder), and its
    DICOMweb client retrieves series as stored. Returns ``ds``."""
    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore

    if type(ds) is DICOMWebDatastore:
        ds.__class__ = cls
    if isinstance(getattr(ds, "_client", None), DICOMwebClient):
        retrieve_series_as_stored(ds._client)
    return ds


class AppPatches:
    """The private methods of ``MONAILabelApp`` that the app overrides (patches 6 and 7), as a mixin put before
    ``MONAILabelApp`` in the app's bases: ``class EnsamApp(AppPatches, MONAILabelApp)``, with
    ``dicomweb_datastore_class`` the DICOMweb datastore class the created one becomes (None: unchanged)."""

    dicomweb_datastore_class = None

    def _init_dicomweb_datastore(self):
        ds = super()._init_dicomweb_datastore()
        return patch_dicomweb_datastore(ds, self.dicomweb_datastore_class) if self.dicomweb_datastore_class else ds

    def _download_dcmqi_tools(self):
        """monailabel fetches dcmqi (a DICOM SEG writer) from GitHub whenever the datastore is DICOMweb, and the app
        fails to start without internet access. ensam needs none of it: saved labels and ``output=dicom_seg``
        results are written with pydicom-seg (``lib.dicom_seg``); a failed download is a warning."""
        try:
            super()._download_dcmqi_tools()
        except Exception as e:  # noqa: BLE001 - offline, proxy, ...
            logger.warning(f"dcmqi tools not available ({type(e).__name__}: {e}); not needed: saved labels and "
                           f"output=dicom_seg are written as DICOM SEG with pydicom-seg")


# ---------------------------------------------------------------------------------------------- 8: image ids
def infer_by_datastore_id(infer: Callable[..., dict], request: dict, datastore) -> dict:
    """Run monailabel's ``MONAILabelApp.infer`` (``infer``, bound) with the request's image id resolved through
    ``datastore``, never against the working directory (see 8. above).

    An ``image`` without a path separator is a datastore id: it becomes the image's path (an id the datastore does
    not hold is ``ImageNotFoundException``, a 404); a path (an uploaded file's or a session's temporary file, which
    the server names itself) is passed on unchanged. monailabel saves the result as a label only for an id
    (``save_label``), so that step is done here once monailabel has run."""
    from monailabel.interfaces.datastore import DefaultLabelTag
    from monailabel.interfaces.exception import ImageNotFoundException

    image = request.get("image") if isinstance(request, dict) else None
    if not isinstance(image, str) or not image or os.sep in image or (os.altsep and os.altsep in image):
        return infer(request, datastore)
    uri = datastore.get_image_uri(image) if datastore is not None else ""
    if not uri:
        raise ImageNotFoundException(f"Image {image} not found")
    save = request.get("save_label", False)
    result = infer(dict(request, image=uri, save_label=False), datastore)
    path = result.get("file") if isinstance(result, dict) else None
    if save and path and os.path.exists(path):
        tag = request.get("label_tag", DefaultLabelTag.ORIGINAL)
        result["label"] = datastore.save_label(image, path, tag, {"model": request.get("model"),
                                                                  "params": result.get("params")})
    return result


# ---------------------------------------------------------------------------------------------- 9: private reads
_TASK_TABLES = {"infer": "_infers", "train": "_trainers", "strategy": "_strategies", "scoring": "_scoring_methods"}


def app_tasks(instance, kind: str) -> dict:
    """The app's tasks of ``kind`` (``infer``, ``train``, ``strategy`` or ``scoring``) by name: monailabel's private
    ``MONAILabelApp._infers`` / ``_trainers`` / ``_strategies`` / ``_scoring_methods`` ({} when there are none)."""
    return getattr(instance, _TASK_TABLES[kind], None) or {}


def dicomweb_series_folder(datastore, series_id: str) -> str:
    """The local folder of series ``series_id`` downloaded by monailabel's DICOMweb datastore (its private local
    cache datastore ``DICOMWebDatastore._datastore``)."""
    return os.path.realpath(os.path.join(datastore._datastore.image_path(), series_id))


@contextlib.contextmanager
def startup_scoring_held(instance, hold: bool):
    """Around ``MONAILabelApp.on_init_complete``: whether it would score every image at start-up (the private
    ``_auto_update_scoring`` set and a scoring method declared) is yielded, and with ``hold`` that scoring is held
    off for the call (the flag cleared, then restored, so later datastore changes still trigger scoring)."""
    auto = getattr(instance, "_auto_update_scoring", False)
    would = bool(auto and app_tasks(instance, "scoring"))
    if hold and would:
        instance._auto_update_scoring = False
    try:
        yield would
    finally:
        instance._auto_update_scoring = auto


def dicomweb_client_of(datastore):
    """The DICOMweb client of monailabel's DICOMweb datastore (its private ``DICOMWebDatastore._client``)."""
    return datastore._client


def app_datastore(instance):
    """The app's datastore as built at start-up (the private ``MONAILabelApp._datastore``; the public
    ``datastore()`` is what ``main.EnsamApp`` overrides to re-read it first)."""
    return instance._datastore
