"""Uploads: images, labels (checked volumes on their image's grid) and sessions (archives unpacked safely,
the same checks as every upload)."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
from fnmatch import fnmatch
from typing import Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import remove_file

from .errors import answers, http_error_for
from .limits import MAX_UPLOAD_VOXELS
from .rules import _check_id, _datastore_image, _id_lock, _json_object

logger = logging.getLogger("ensam.server")


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


@answers("saving the label of {image!r} (tag {tag!r})")
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
    finally:
        remove_file(tmp)
    res.update({"image": image, "label": label_id})
    return res



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
