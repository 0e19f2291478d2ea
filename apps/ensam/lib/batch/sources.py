"""Where a batch job's studies come from: a folder of volumes, a MONAI Label datastore's ids, or DICOMweb series;
and the prompts a manifest gives each study.

* a folder: every volume file at its top level (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``) and every
  sub-folder holding DICOM files (a series); the id is the file name without its suffix, or the folder's name;
* a datastore (a local studies folder as ``make serve`` uses it): its image ids, each resolved by the datastore
  itself (``lib.monailabel_patches.local_datastore``, read only); the server hands its own datastore;
* DICOMweb: series by SeriesInstanceUID, or every series a QIDO search finds (e.g. ``{"Modality": "CT"}``); each
  worker fetches its series itself (:mod:`lib.batch.worker`), and the result goes back as DICOM SEG.

A manifest (:func:`load_manifest`, THE manifest reader of the REST batch route and of ``python -m lib.batch``:
``{id: {prompts} or [{prompts}, ...]}`` or ``[{"image": id, ...}]``) gives each study its objects; the prompts are
checked and parsed here by ``lib.request_parsing.parse_prompts`` (the same rule and limits as an interactive
request).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

from lib.batch.job import Study
from lib.batch.worker import dicomweb_client
from lib.request_parsing import MAX_BOXES, RequestError, parse_prompts

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
PROMPT_KEYS = ("foreground", "background", "points", "point_labels", "roi", "boxes", "label")
MAX_OBJECTS = MAX_BOXES  # objects (one inference each) per image of a manifest


def load_manifest(value: Any) -> Optional[Dict[str, List[dict]]]:
    """Normalise a manifest to ``{image_id: [prompt dict, ...]}`` (None when there is none); every entry is checked
    (known keys, prompts well-formed and within the per-request limits, at most ``MAX_OBJECTS`` per image)."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        s = value.strip()
        try:
            if s.startswith("{") or s.startswith("["):
                value = json.loads(s)
            else:
                if not os.path.exists(s):
                    raise RequestError(f"manifest file not found: {s!r}", status_code=404)
                with open(s) as f:
                    value = json.load(f)
        except json.JSONDecodeError as e:
            raise RequestError(f"manifest is not valid JSON: {e}") from None
    out: Dict[str, List[dict]] = {}
    if isinstance(value, list):
        for n, item in enumerate(value):
            if not isinstance(item, dict) or not item.get("image"):
                raise RequestError(f"manifest[{n}] must be an object with an 'image' id and prompts, got {item!r}")
            out.setdefault(str(item["image"]), []).append({k: v for k, v in item.items() if k != "image"})
    elif isinstance(value, dict):
        for image_id, entry in value.items():
            entries = entry if isinstance(entry, list) else [entry]
            for e in entries:
                if not isinstance(e, dict):
                    raise RequestError(f"manifest[{image_id!r}] must be an object of prompts (or a list of them)")
            out[str(image_id)] = [dict(e) for e in entries]
    else:
        raise RequestError(f"manifest must be an object image_id -> prompts, got {type(value).__name__}")
    for image_id, entries in out.items():
        if len(entries) > MAX_OBJECTS:
            raise RequestError(f"manifest[{image_id!r}]: too many objects: at most {MAX_OBJECTS} objects per image, "
                               f"got {len(entries)}", status_code=413)
        for n, e in enumerate(entries):
            unknown = set(e) - set(PROMPT_KEYS)
            if unknown:
                raise RequestError(f"manifest[{image_id!r}]: unknown keys {sorted(unknown)}; use {PROMPT_KEYS}")
            try:
                parse_prompts(e)
            except RequestError as err:
                raise RequestError(f"manifest[{image_id!r}][{n}]: {err}", status_code=err.status_code) from None
    return out


def _volume_id(name: str) -> Optional[str]:
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _holds_dicom(folder: str) -> bool:
    from lib.io.imageio import _has_dicom_preamble

    for entry in os.scandir(folder):
        if entry.is_file() and (entry.name.lower().endswith(".dcm") or _has_dicom_preamble(entry.path)):
            return True
    return False


def studies_from_folder(folder: str) -> List[Study]:
    """Every volume file and DICOM series folder directly in ``folder`` (hidden entries skipped), sorted by id."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such folder: {folder!r}")
    out: Dict[str, Study] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        sid = _volume_id(entry.name) if entry.is_file() else (entry.name if _holds_dicom(entry.path) else None)
        if sid is None:
            continue
        if sid in out:
            raise ValueError(f"two inputs in {folder!r} have the id {sid!r}: {out[sid].path} and {entry.path}")
        out[sid] = Study(sid, path=os.path.abspath(entry.path))
    return [out[k] for k in sorted(out)]


def open_datastore(folder: str):
    """A local MONAI Label datastore folder, read only (nothing rewritten, no file watcher)."""
    from lib.monailabel_patches import local_datastore

    return local_datastore(folder, read_only=True)


def studies_from_datastore(datastore, ids: Optional[Sequence[str]] = None) -> List[Study]:
    """Studies of a datastore (a local one: its files; a DICOMweb one: its series, fetched by the workers).
    ``ids``: those image ids (an unknown id becomes a study that fails with its reason); None: every image."""
    known = set(datastore.list_images())
    chosen = sorted(known) if ids is None else list(dict.fromkeys(str(i) for i in ids))
    ref = dicomweb_ref(datastore)
    out = []
    for sid in chosen:
        if sid not in known:
            out.append(Study(sid, path=""))  # fails: "image file not found"
        elif ref is not None:
            out.append(Study(sid, dicomweb=dict(ref, series=sid)))
        else:
            out.append(Study(sid, path=datastore.get_image_uri(sid)))
    return out


def dicomweb_ref(datastore) -> Optional[Dict[str, str]]:
    """{"url", prefixes} of a DICOMweb datastore (its ``name()`` is the server's base URL), None for others."""
    from monailabel.datastore.dicom import DICOMWebDatastore

    if not isinstance(datastore, DICOMWebDatastore):
        return None
    from monailabel.config import settings

    return {"url": datastore.name(), "qido_prefix": settings.MONAI_LABEL_QIDO_PREFIX or "",
            "wado_prefix": settings.MONAI_LABEL_WADO_PREFIX or "",
            "stow_prefix": settings.MONAI_LABEL_STOW_PREFIX or ""}


def studies_from_dicomweb(url: str, series: Optional[Sequence[str]] = None, search: Optional[dict] = None,
                          **prefixes: str) -> List[Study]:
    """DICOMweb series: the SeriesInstanceUIDs ``series``, or every series a QIDO search with ``search`` finds."""
    ref = {"url": url.rstrip("/"), **{k: v for k, v in prefixes.items() if v}}
    if series:
        return [Study(str(s), dicomweb=dict(ref, series=str(s))) for s in dict.fromkeys(series)]
    found = dicomweb_client(ref).search_for_series(search_filters=dict(search or {}))
    out = []
    for ds in found:
        uid = (ds.get("0020000E") or {}).get("Value", [""])[0]
        study = (ds.get("0020000D") or {}).get("Value", [""])[0]
        if uid:
            out.append(Study(str(uid), dicomweb=dict(ref, series=str(uid), study=str(study))))
    return sorted(out, key=lambda s: s.id)


def prompt_objects(entries: Iterable[dict]) -> List[dict]:
    """A manifest's prompt dicts (one per object, as :func:`load_manifest` checked them) -> the
    objects a worker segments: ``{"label", "points", "point_labels", "boxes"}`` (voxel indices of the image)."""
    out = []
    for n, e in enumerate(entries):
        points, labels, boxes = parse_prompts(e)
        out.append({"label": str(e.get("label") or f"object_{n + 1}"), "points": points, "point_labels": labels,
                    "boxes": boxes})
    return out


def with_manifest(studies: List[Study], manifest: Dict[str, List[dict]]) -> List[Study]:
    """The studies a manifest names, each with its objects (a named id the input lacks: a failing study)."""
    by_id = {s.id: s for s in studies}
    out = []
    for sid, entries in manifest.items():
        s = by_id.get(sid) or Study(sid, path="")
        out.append(Study(s.id, s.path, s.dicomweb, prompt_objects(entries)))
    return out
