"""Where a batch job's studies come from: a folder of volumes, a MONAI Label datastore's ids, or DICOMweb series;
and the prompts a manifest gives each study.

* a folder: every volume file at its top level (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``) and every
  sub-folder holding DICOM files (a series); the id is the file name without its suffix, or the folder's name;
* a datastore (a local studies folder as ``make serve`` uses it): its image ids, each resolved by the datastore
  itself (``lib.datastore.AtomicLocalDatastore``, read only); the server hands its own datastore;
* DICOMweb: series by SeriesInstanceUID, or every series a QIDO search finds (e.g. ``{"Modality": "CT"}``); each
  worker fetches its series itself (:mod:`lib.batch.worker`), and the result goes back as DICOM SEG.

A manifest (:func:`lib.infers.batch.load_manifest`, the REST batch route's format: ``{id: {prompts} or [{prompts},
...]}`` or ``[{"image": id, ...}]``) gives each study its objects; the prompts are parsed once, here, by
``lib.infers.request_parsing.parse_prompts`` (the same rule and limits as an interactive request).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

from lib.batch.job import Study

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


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
    from monailabel.config import settings

    from lib.datastore import AtomicLocalDatastore

    return AtomicLocalDatastore(folder, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False,
                                read_only=True)


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
            "wado_prefix": settings.MONAI_LABEL_WADO_PREFIX or "", "stow_prefix": settings.MONAI_LABEL_STOW_PREFIX or ""}


def studies_from_dicomweb(url: str, series: Optional[Sequence[str]] = None, search: Optional[dict] = None,
                          **prefixes: str) -> List[Study]:
    """DICOMweb series: the SeriesInstanceUIDs ``series``, or every series a QIDO search with ``search`` finds."""
    ref = {"url": url.rstrip("/"), **{k: v for k, v in prefixes.items() if v}}
    if series:
        return [Study(str(s), dicomweb=dict(ref, series=str(s))) for s in dict.fromkeys(series)]
    from lib.batch.worker import dicomweb_client

    found = dicomweb_client(ref).search_for_series(search_filters=dict(search or {}))
    out = []
    for ds in found:
        uid = (ds.get("0020000E") or {}).get("Value", [""])[0]
        study = (ds.get("0020000D") or {}).get("Value", [""])[0]
        if uid:
            out.append(Study(str(uid), dicomweb=dict(ref, series=str(uid), study=str(study))))
    return sorted(out, key=lambda s: s.id)


def prompt_objects(entries: Iterable[dict]) -> List[dict]:
    """A manifest's prompt dicts (one per object, as :func:`lib.infers.batch.load_manifest` checked them) -> the
    objects a worker segments: ``{"label", "points", "point_labels", "boxes"}`` (voxel indices of the image)."""
    from lib.infers.request_parsing import parse_prompts

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


def load_manifest(value: Any) -> Optional[Dict[str, List[dict]]]:
    """:func:`lib.infers.batch.load_manifest` (THE manifest reader: forms, limits, prompt checks)."""
    from lib.infers.batch import load_manifest as _load

    return _load(value)
