"""The DICOMweb proxy OHIF reads through (``/proxy/dicom/{wado,qido}/<path>``), confined to DICOMweb.

monailabel 0.8.5's proxy joins any path to the DICOMweb server's address and sends it with the server's stored
credentials, for GET and POST, under ``/proxy/dicom/{wado,qido,stow}/...`` and ``/proxy/dicom/<anything>``: a
``..`` in the path (``curl --path-as-is .../proxy/dicom/wado/../../system``) or the bare ``/proxy/dicom/patients``
reached the PACS's whole REST API (Orthanc: ``/system``, ``/patients``, ``/instances/<id>/file``). It also drops the
client's ``Accept`` header and query string, and blocks the event loop.

Here one route answers every method under ``/proxy/dicom/``:

* only GET, only ``wado`` and ``qido``, and only the DICOMweb resources a viewer reads
  (:func:`dicomweb_path_problem`: ``studies[/<uid>[/series[/<uid>[/instances[/<uid>[/frames/<n,...>]]]]]]``, their
  ``metadata`` / ``rendered`` / ``thumbnail``, an instance's ``bulk/...`` data, and QIDO's ``series`` /
  ``instances`` searches); UIDs are digits and dots. Anything else is 404 naming the rule (POST / STOW: 405): the
  viewer never writes through the proxy (labels are saved through ``PUT /datastore/label``);
* the client's ``Accept`` header and query string are forwarded (OHIF asks for frames with ``transfer-syntax=*``;
  without it Orthanc 1.10.1 + orthanc-gdcm 1.5 decodes JPEG 2000 frames itself and crashes after a few);
* the request runs in the thread pool; a Google Healthcare store (token auth) keeps monailabel's own proxy for the
  same confined paths.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

import requests
from fastapi import Depends, HTTPException, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from monailabel.config import settings
from monailabel.endpoints.proxy import proxy_dicom
from monailabel.endpoints.user.auth import RBAC, User

logger = logging.getLogger("ensam.proxy")

_UID = r"[0-9]{1,64}(?:\.[0-9]{1,64}){0,63}"
_VIEWS = r"(?:/(?:metadata|rendered|thumbnail))?"
_INSTANCE = rf"/instances/{_UID}(?:{_VIEWS}|/frames/[0-9]{{1,6}}(?:,[0-9]{{1,6}}){{0,511}}{_VIEWS}|/bulk(?:/[0-9A-Za-z,]{{1,64}}){{1,16}})"
_SERIES = rf"/series/{_UID}(?:{_VIEWS}|/instances|{_INSTANCE})"
_STUDY = rf"studies/{_UID}(?:{_VIEWS}|/series|/instances|{_SERIES})"
DICOMWEB_PATH = re.compile(rf"^(?:studies|series|instances|{_STUDY})$")
PATH_RULE = ("the DICOMweb proxy serves the viewer's DICOMweb reads only: GET wado/ or qido/ followed by studies"
             "[/<uid>[/series[/<uid>[/instances[/<uid>[/frames/<n>]]]]]] (or their metadata / rendered / thumbnail, "
             "an instance's bulk data, or a QIDO search of series / instances); UIDs are digits and dots")
_FORWARDED_REQUEST_HEADERS = ("accept",)
_RETURNED_HEADERS = ("content-type", "content-location", "warning")


def dicomweb_path_problem(op: str, path: str) -> Optional[str]:
    """Why ``/proxy/dicom/<op>/<path>`` is not a DICOMweb read the proxy forwards, or None when it is one."""
    if op not in ("wado", "qido"):
        return f"/proxy/dicom/{op}/...: not a DICOMweb read; {PATH_RULE}"
    if any(seg in ("", ".", "..") for seg in path.split("/")) or any(c in path for c in "\\%?#;") \
            or not DICOMWEB_PATH.match(path):
        return f"{path!r} is not a DICOMweb resource: {PATH_RULE}"
    return None


def _target(op: str, path: str) -> str:
    studies = (settings.MONAI_LABEL_STUDIES or "").rstrip("/")
    prefix = settings.MONAI_LABEL_QIDO_PREFIX if op == "qido" else settings.MONAI_LABEL_WADO_PREFIX
    if op == "qido" and path.endswith("metadata"):  # as monailabel's proxy: some OHIF versions ask QIDO for it
        prefix = settings.MONAI_LABEL_WADO_PREFIX
    return "/".join(x.strip("/") for x in (studies, prefix or "", path) if x and x.strip("/"))


def _dicomweb_get(url: str, request: Request) -> Response:
    headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_REQUEST_HEADERS}
    user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
    try:
        r = requests.get(url, params=list(request.query_params.multi_items()), headers=headers,
                         auth=(user, password) if user and password else None, allow_redirects=False,
                         timeout=settings.MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT)
    except requests.RequestException as e:
        logger.warning(f"DICOMweb proxy: {url}: {type(e).__name__}: {e}")
        raise HTTPException(status_code=502, detail=f"the DICOMweb server did not answer: {type(e).__name__}") from e
    out = {k: v for k, v in r.headers.items() if k.lower() in _RETURNED_HEADERS}
    return Response(content=r.content, status_code=r.status_code, headers=out)


async def dicomweb_proxy(request: Request, path: str,
                         user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> Response:
    """Any method on ``/proxy/dicom/<path>``: a DICOMweb read (GET ``wado/...`` or ``qido/...``, see the module
    doc) goes to the DICOMweb server; anything else is refused (405 for another method, 404 for another path) and
    never reaches it."""
    if request.method != "GET":
        raise HTTPException(status_code=405, detail=f"the DICOMweb proxy is read-only (GET): {PATH_RULE}",
                            headers={"Allow": "GET"})
    op, _, rest = path.partition("/")
    problem = dicomweb_path_problem(op, rest)
    if problem:
        logger.warning(f"rejected request (404): DICOMweb proxy: {path!r}")
        raise HTTPException(status_code=404, detail=problem)
    studies = settings.MONAI_LABEL_STUDIES or ""
    if not studies.startswith(("http://", "https://")):
        raise HTTPException(status_code=404, detail="the datastore is not a DICOMweb server: nothing to proxy")
    if "googleapis.com" in studies:  # token auth: monailabel's own proxy, for the confined path only
        return await proxy_dicom(request, op, rest)
    return await run_in_threadpool(_dicomweb_get, _target(op, rest), request)
