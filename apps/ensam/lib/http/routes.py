"""The routes ensam puts in front of monailabel's for the same paths (``ROUTES``), and their handlers: datastore
info and deletes, weights, the thread-pool inference route (DICOM SEG output), active learning, scoring, batch,
training."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse, Response
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import remove_file


from .errors import answers
from .rules import ID_RULE, _check_id, _check_image_ids, _datastore_image, _id_lock, _json_object, _json_value, _task
from .uploads import (_check_infer_raw_label, _check_volume_upload, _save_upload, _upload_suffix)

logger = logging.getLogger("ensam.server")


# ---------------------------------------------------------------------------------------------------- misc routes
# monailabel routes that answered 500 to the schema-driven fuzz of the API (tests/test_hostile_input.py)
@answers("updating the info of image {image!r}")
def update_image_info_checked(image: str, info: str = Form("{}"),
                              user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    """PUT ``/datastore/image/info``: ``info`` must be a JSON object (400; monailabel: 500), the image known (404)."""
    _check_id(image)
    i = _json_object(info, "info")
    if user.username:
        i["user"] = user.username
    return app_instance().datastore().update_image_info(image, i)


@answers("updating the info of label {label!r} (tag {tag!r})")
def update_label_info_checked(label: str, tag: str, info: str = Form("{}"),
                              user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    """PUT ``/datastore/label/info``: ``info`` must be a JSON object (400; monailabel: 500), the label known (404)."""
    _check_id(label, "label id")
    _check_id(tag, "label tag")
    i = _json_object(info, "info")
    if user.username:
        i["user"] = user.username
    return app_instance().datastore().update_label_info(label, tag, i)


@answers("deleting image {id!r}")
def delete_image_checked(id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    """DELETE ``/datastore/image`` (and the deprecated ``DELETE /datastore/``): the image, every file of its id and
    its labels (every tag) go, under the id's lock (a label save of that id waits, then finds no image: 404);
    unknown id: 404. monailabel's route ran on the event loop, outside any lock: a save racing it left an orphan
    label, and a second file of the id (another extension) stayed listed (issue 25 #11, #12)."""
    _check_id(id)
    with _id_lock(id):
        app_instance().datastore().remove_image(id)
    logger.info(f"image {id!r} deleted with its labels by {user.username or 'anonymous'}")
    return {}


@answers("the dataset archive")
def download_dataset_checked(limit_cases: Optional[int] = None,
                             user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    """GET ``/datastore/dataset``: 404 when no image has a final label (monailabel: 500 from an assertion)."""
    if limit_cases is not None and limit_cases < 1:
        raise HTTPException(status_code=400, detail=f"limit_cases must be at least 1, got {limit_cases}")
    ds = app_instance().datastore()
    if not ds.get_labeled_images():
        raise HTTPException(status_code=404, detail="no image has a final label yet: the dataset archive is empty")
    path = ds.get_dataset_archive(limit_cases)
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
    _task("infer", model)
    raise HTTPException(status_code=400, detail=f"{model!r} segments 3D volumes, not whole-slide images: use "
                                                f"POST /infer/{model}")



# ---------------------------------------------------------------------------------------------------- weights
def _weights_paths(model: str) -> list:
    """``[pre-trained, fine-tuned]`` weights paths of infer task ``model`` (404 for an unknown one)."""
    provider = getattr(_task("infer", model, "model"), "provider", None)
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


@answers("inference model={model} image={image}")
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
    _task("infer", model)
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
    return run_inference(background_tasks, model, image, session_id, params, file, label, output)


def infer_as_dicom_seg(background_tasks: BackgroundTasks, model: str, image: str, session_id: str, params: str,
                       file: Optional[UploadFile], label: Optional[UploadFile], p: Dict[str, Any]) -> Response:
    """``output=dicom_seg``: the result as a DICOM SEG on the image's series, written with pydicom-seg by
    ``lib.dicom_seg`` (monailabel 0.8.5 needs dcmqi for it, which an offline server cannot download: 500).
    Segments are named from the request's ``label_info`` if given, else from the result's ``label_names``. The image
    must be a series of the DICOMweb datastore (the SEG references its instances): 400 otherwise; an empty result
    is 422 (a SEG needs a segment)."""
    from monailabel.datastore.dicom import DICOMWebDatastore

    from lib.dicom_seg import write_dicom_seg  # the app's lib (see the module docstring)
    from lib.monailabel_patches import dicomweb_series_folder

    datastore = app_instance().datastore()
    if file or session_id or not image or not isinstance(datastore, DICOMWebDatastore):
        raise HTTPException(status_code=400, detail="output=dicom_seg needs a DICOM series: ?image=<SeriesInstanceUID>"
                                                    " on a server started on a DICOMweb store (--studies "
                                                    "<url>/dicom-web); for other images use output=image")
    label_info = p.get("label_info")
    if label_info is not None and not (isinstance(label_info, list) and all(isinstance(e, dict) for e in label_info)):
        raise HTTPException(status_code=400, detail="'label_info' must be a list of {\"name\": ..., \"idx\": <value>}")
    result = _inference_result(background_tasks, model, image, p, label)
    mask_path = result.get("file") or ""
    if not mask_path or not os.path.exists(mask_path):
        raise HTTPException(status_code=500, detail=f"inference model={model} image={image} gave no result image")
    try:  # the mask file the task wrote, as it is: no HTTP answer made of it and read back
        seg = write_dicom_seg(dicomweb_series_folder(datastore, image), mask_path, label_info,
                              (result.get("params") or {}).get("label_names"), series_description=model)
    finally:
        remove_file(mask_path)
    if not seg:
        raise HTTPException(status_code=422, detail="the result is empty (no voxel labelled): a DICOM SEG needs at "
                                                    "least one segment; output=json gives the result's details")
    background_tasks.add_task(remove_file, seg)
    return FileResponse(seg, media_type="application/dicom", filename=f"{model}_{image}.dcm")


def _inference_result(background_tasks: BackgroundTasks, model: str, image: str, params: Dict[str, Any],
                      label: Optional[UploadFile]) -> dict:
    """The infer task's own result for datastore image ``image`` (``{"file": the mask it wrote, "params": its
    JSON}``), the request built as monailabel's ``run_inference`` builds it (the app's infer config, then
    ``params``; an uploaded label in a temporary file, OHIF's raw ``.bin`` put on the image's grid) but not turned
    into an HTTP answer."""
    import pathlib

    from monailabel.datastore.utils.convert import binary_to_image

    instance = app_instance()
    request: Dict[str, Any] = {"model": model, "image": image}
    if label:
        ext = "".join(pathlib.Path(label.filename).suffixes) if label.filename else ".nii.gz"
        fd, label_file = tempfile.mkstemp(suffix=ext)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(label.file, out)
        background_tasks.add_task(remove_file, label_file)
        if ext == ".bin":
            label_file = binary_to_image(instance.datastore().get_image_uri(image), label_file)
            background_tasks.add_task(remove_file, label_file)
        request["label"] = label_file
    request.update(instance.info().get("config", {}).get("infer", {}))
    request.update(params)
    result = instance.infer(request)
    if not isinstance(result, dict):
        raise HTTPException(status_code=500, detail=f"inference model={model} image={image} failed")
    return result


@answers("next sample ({strategy})")
async def next_sample_checked(
    strategy: str,
    params: Optional[dict] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    """POST ``/activelearning/{strategy}``: an unknown strategy is 404 naming the known ones (monailabel: 500).
    ``async`` like monailabel's route (and the two below): requests of these kinds stay one at a time, as the
    strategies' "recently served" bookkeeping and the "task already running" checks expect."""
    from monailabel.endpoints.activelearning import sample

    _task("strategy", strategy)
    return sample(strategy, params, user.username)


@answers("scoring ({method})")
async def scoring_checked(
    method: str,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    """POST ``/scoring/{method}``: an unknown method is 404 naming the known ones, ``images`` must be datastore ids
    (monailabel starts the task anyway and the error only shows in its log)."""
    from monailabel.endpoints.scoring import run_method

    _task("scoring", method)
    images = (params or {}).get("images")
    if images not in (None, "", "all"):
        _check_image_ids(images)
    return run_method(method, params, run_sync)


@answers("batch inference ({model})")
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

    from lib.batch.sources import load_manifest  # the app's lib (see the module docstring)

    _task("infer", model)
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
    checked = load_manifest(manifest)
    if checked:
        _check_image_ids(list(checked), "manifest")
    return run(model, images, params, run_sync)


@answers("training ({model})")
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

    _check_train_request(model, _task("train", model), params)
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
            raise HTTPException(status_code=400, detail=str(e)) from None


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


@answers("training (all train tasks)")
def train_all_checked(
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
):
    """POST ``/train/`` (monailabel's deprecated "run every train task", ``params`` keyed by model name): each
    task's request (monailabel merges ``params`` and ``params[model]``) is checked as in ``train_checked`` before
    any starts."""
    from monailabel.endpoints.train import run

    from lib.monailabel_patches import app_tasks  # the app's lib (see the module docstring)

    trainers = app_tasks(app_instance(), "train")
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
