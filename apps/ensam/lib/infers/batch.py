"""Batch inference over the datastore, prompt-free (``ensam_seg``) or with a prompt manifest (``ensam``).

``POST /batch/infer/ensam_seg?images=unlabeled`` segments every selected image. ``POST /batch/infer/ensam`` with a
JSON body ``{"manifest": {...}}`` runs the interactive model once per image with the prompts the manifest lists:

    {"manifest": {"image_id": {"boxes": [[i0, i1, j0, j1, k0, k1]], "foreground": [[i, j, k]], "label": "liver"},
                  "other_id": [{"label": "liver", "roi": [...]}, {"label": "spleen", "points": [...],
                                "point_labels": [1, 0]}]}}

A list of objects gives one label map with values 1..N in list order (at most ``MAX_OBJECTS`` per image; each
object's prompts are checked, with the per-request limits of an interactive click, when the manifest is loaded,
before any image is processed). ``manifest`` may also be a list ``[{"image": id, ...}, ...]``, or, for callers
inside the server only, a path to such a JSON file (the HTTP route accepts only an inline manifest). Results are
saved in the datastore (tag ``label_tag``, default ``original``). Progress: each image logs ``ensam batch: k/N
...``; monailabel shows the last lines in ``GET /batch/infer`` (``details``) while the task runs, and the returned
summary when it is done. Prompt-free batches go through ``ensam_seg``, i.e. segmentation by example where a
name's atlas route validates (``lib.infers.seg_by_example``): its progress lines (each atlas registered, each
structure segmented) come between the image lines, and each image's summary carries the per-structure
``structures`` (route, uncertainty).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType, BatchInferTask
from monailabel.utils.others.generic import remove_file

from ..io.imageio import load_volume, write_mask
from .request_parsing import MAX_BOXES, RequestError, parse_prompts

logger = logging.getLogger(__name__)

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


class EnsamBatchInfer(BatchInferTask):
    def __init__(self, infers: Optional[dict] = None):
        super().__init__()
        self.infers = infers or {}

    def get_images(self, request, datastore: Datastore):
        manifest = request.get("_manifest")
        images = request.get("images", BatchInferImageType.IMAGES_ALL)
        if manifest is not None and (not images or images == BatchInferImageType.IMAGES_ALL):
            return list(manifest.keys())
        return super().get_images(request, datastore)

    def __call__(self, request, datastore: Datastore, infer):
        start = time.time()
        request = dict(request)
        manifest = load_manifest(request.pop("manifest", None))
        request["_manifest"] = manifest
        model = request.get("model")
        task = self.infers.get(model)
        if task is not None and getattr(task, "type", None) == "deepgrow" and manifest is None:
            raise RequestError(f"batch inference with the interactive model {model!r} needs a prompt 'manifest' "
                               f"(per-image boxes/points); use '{model}_seg' for prompt-free segmentation")
        image_ids = sorted(self.get_images(request, datastore))
        request.pop("_manifest", None)
        known = set(datastore.list_images())
        if manifest is not None:
            missing = sorted(set(manifest) - known)
            if missing:
                logger.warning(f"ensam batch: manifest images not in the datastore (skipped): {missing}")
        max_batch_size = int(request.get("max_batch_size", 0) or 0)
        if max_batch_size > 0:
            image_ids = image_ids[:max_batch_size]
        label_tag = request.get("label_tag") or DefaultLabelTag.ORIGINAL
        total = len(image_ids)
        logger.info(f"ensam batch: {total} images; model={model}; manifest={'yes' if manifest else 'no'}")

        result: Dict[str, Any] = {}
        done = failed = 0
        for idx, image_id in enumerate(image_ids):
            t0 = time.time()
            try:
                if image_id not in known:
                    raise RequestError(f"image {image_id!r} is not in the datastore", status_code=404)
                entries = manifest.get(image_id) if manifest is not None else None
                if manifest is not None and not entries:
                    raise RequestError(f"no prompts for image {image_id!r} in the manifest")
                result[image_id] = self._run_one(request, image_id, entries, label_tag, datastore, infer)
                done += 1
                status = "ok"
            except Exception as e:  # noqa: BLE001 - one bad image must not stop the batch
                failed += 1
                status = f"error: {e}"
                result[image_id] = {"error": str(e)}
                logger.warning(f"ensam batch: {image_id} failed: {e}", exc_info=not isinstance(e, ValueError))
            logger.info(f"ensam batch: {idx + 1}/{total} {image_id} {status} ({time.time() - t0:.1f}s)")
        logger.info(
            f"ensam batch: finished {done} ok, {failed} failed of {total} in {time.time() - start:.1f}s"
        )
        return result

    def _run_one(self, request, image_id, entries, label_tag, datastore, infer) -> dict:
        base = {k: v for k, v in request.items() if k not in PROMPT_KEYS and k not in ("images",)}
        base.update({"image": image_id, "label_tag": label_tag, "session_memory": False, "reset_state": True})
        if not entries:  # prompt-free: one infer call, saved by monailabel
            req = copy.deepcopy(base)
            req["save_label"] = True
            r = infer(req, datastore)
            if r.get("file"):
                remove_file(r.pop("file"))
            return {"label": r.get("label"), "params": _brief(r.get("params"))}

        # prompted: one infer call per object, merged into one label map (values 1..N in manifest order)
        merged = None
        names: Dict[str, int] = {}
        params = []
        for n, entry in enumerate(entries):
            req = copy.deepcopy(base)
            req.update(entry)
            req["save_label"] = False
            r = infer(req, datastore)
            f = r.get("file")
            try:
                m = load_volume(f).array > 0
            finally:
                remove_file(f)
            if merged is None:
                merged = np.zeros(m.shape, dtype=np.uint8)
            merged[m] = n + 1
            names[str(entry.get("label") or f"object_{n + 1}")] = n + 1
            params.append(_brief(r.get("params")))
        ref = load_volume(datastore.get_image_uri(image_id))
        out = write_mask(merged, ref, extension=".nii.gz")
        try:
            label_id = datastore.save_label(
                image_id, out, label_tag, {"model": request.get("model"), "params": {"label_names": names}}
            )
        finally:
            remove_file(out)
        return {"label": label_id, "label_names": names, "params": params}


def _brief(params: Optional[dict]) -> dict:
    params = params or {}
    # structures: ensam_seg's per-structure route and confidence (atlas agreement / uncertainty; issue 12)
    return {k: params[k] for k in ("label_names", "voxels", "structures", "latencies") if k in params}
