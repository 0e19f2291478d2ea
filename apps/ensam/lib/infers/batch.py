"""Batch inference over the datastore, prompt-free (``ensam_seg``) or with a prompt manifest (``ensam``): the REST
route's face of THE batch job, :mod:`lib.batch` (the command ``python -m lib.batch`` runs the same job).

``POST /batch/infer/ensam_seg?images=unlabeled`` segments every selected image (``labels``: the names, default
``ensam_seg``'s default names). ``POST /batch/infer/ensam`` with a JSON body ``{"manifest": {...}}`` runs the
interactive model once per object with the prompts the manifest lists:

    {"manifest": {"image_id": {"boxes": [[i0, i1, j0, j1, k0, k1]], "foreground": [[i, j, k]], "label": "liver"},
                  "other_id": [{"label": "liver", "roi": [...]}, {"label": "spleen", "points": [...],
                                "point_labels": [1, 0]}]}}

A list of objects gives one label map with values 1..N in list order (at most ``lib.batch.sources.MAX_OBJECTS``
per image; each object's prompts are checked, with the per-request limits of an interactive click, when the manifest
is loaded by ``lib.batch.sources.load_manifest``, before any image is processed). ``manifest`` may also be a list
``[{"image": id, ...}, ...]``, or, for callers inside the server only, a path to such a JSON file (the HTTP route
accepts only an inline manifest).

Where the job runs: ``--conf batch_backend local|ray`` (default ``local``: in the batch task's process) and
``--conf ray_address`` (Ray: empty = a new local Ray, ``auto``, ``host:port``, ``ray://host:port``); request keys
``max_workers`` (Ray actors) and ``gpus_per_worker`` (> 0: GPU workers). The job keeps one result per (image,
weights version, request) in its results folder (``--conf batch_results``, default ``<studies>/.ensam-batch``
for a local datastore): a batch run again after a kill does only the images without a result. Each result is
then saved in the datastore (tag ``label_tag``, default ``original``); for a DICOMweb datastore the job stores it
as DICOM SEG in the DICOMweb server instead. Progress: each image logs ``ensam batch: k/N <id> ok|error ...``;
monailabel shows the last lines in ``GET /batch/infer`` (``details``) while the task runs, and the returned summary
when it is done. Prompt-free names are segmented by the job by their learned label token
(``EnsamEngine.segment_labels``), except on the local backend when ``ensam_seg`` routes a requested name by atlas:
then each image goes through ``ensam_seg`` itself (segmentation by example; its per-structure ``structures`` in
each summary). On Ray such names are segmented by token, and logged as such.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType, BatchInferTask

from lib.batch.job import BatchJob, run_job
from lib.batch.sources import PROMPT_KEYS, dicomweb_ref, load_manifest, studies_from_datastore, with_manifest
from lib.batch.store import ResultStore
from lib.request_parsing import RequestError

logger = logging.getLogger(__name__)

# the settings this task reads from the app's --conf (declared, with their defaults and checks, in lib.settings)
BATCH_SETTINGS = ("batch_backend", "ray_address", "batch_results")


class EnsamBatchInfer(BatchInferTask):
    """monailabel's batch task for ensam: the request checked, the images of the datastore turned into the studies
    of a :mod:`lib.batch` job, the job run on ``batch_backend``, each result saved in the datastore."""

    def __init__(self, infers: Optional[dict] = None, conf: Any = None):
        super().__init__()
        self.infers = infers or {}
        self.conf = conf  # None: the server's --conf as monailabel hands it to every process (read per call)

    def settings(self) -> Dict[str, str]:
        """The batch settings of the app's ``--conf`` (a dict of ``--conf`` pairs, parsed and checked by
        :func:`lib.settings.parse_conf`, or already parsed settings): {name: value, "" when unset}."""
        from lib.settings import parse_conf

        conf = self.conf
        if conf is None:
            from monailabel.config import settings

            conf = settings.MONAI_LABEL_APP_CONF or {}
        if isinstance(conf, dict):
            conf = parse_conf(conf)
        return {k: str(getattr(conf, k) or "").strip() for k in BATCH_SETTINGS}

    def get_images(self, request, datastore: Datastore):
        manifest = request.get("_manifest")
        images = request.get("images", BatchInferImageType.IMAGES_ALL)
        if manifest is not None and (not images or images == BatchInferImageType.IMAGES_ALL):
            return list(manifest.keys())
        return super().get_images(request, datastore)

    def __call__(self, request, datastore: Datastore, infer=None):
        start = time.time()
        request = dict(request)
        manifest = load_manifest(request.pop("manifest", None))
        request["_manifest"] = manifest
        model = request.get("model")
        task = self.infers.get(model)
        if task is not None and getattr(task, "type", None) == "deepgrow" and manifest is None:
            raise RequestError(f"batch inference with the interactive model {model!r} needs a prompt 'manifest' "
                               f"(per-image boxes/points); use '{model}_seg' for prompt-free segmentation")
        conf = self.settings()
        image_ids = sorted(self.get_images(request, datastore))
        request.pop("_manifest", None)
        max_batch_size = int(request.get("max_batch_size", 0) or 0)
        if max_batch_size > 0:
            image_ids = image_ids[:max_batch_size]
        label_tag = request.get("label_tag") or DefaultLabelTag.ORIGINAL
        total = len(image_ids)
        logger.info(f"ensam batch: {total} images; model={model}; manifest={'yes' if manifest else 'no'}; "
                    f"backend={conf['batch_backend']}")

        result: Dict[str, Any] = {}
        studies = studies_from_datastore(datastore, image_ids)
        names: List[str] = []
        vocab: Dict[str, int] = {}
        if manifest is not None:
            for i in image_ids:
                if not manifest.get(i):
                    result[i] = {"error": f"no prompts for image {i!r} in the manifest"}
            studies = with_manifest(studies, {i: manifest[i] for i in image_ids if manifest.get(i)})
        else:
            names, vocab, by_atlas = self._names(request, model)
            if by_atlas and conf["batch_backend"] == "local" and infer is not None:
                # names whose atlas route validates, on the server: each image through the ensam_seg task itself,
                # so that they are segmented by example (the job's workers know only the label tokens)
                result.update(self._through_task(request, image_ids, label_tag, datastore, infer))
                ok = sum("error" not in r for r in result.values())
                logger.info(f"ensam batch: finished {ok} ok, {len(result) - ok} failed of {total} in "
                            f"{time.time() - start:.1f}s")
                return result
            if by_atlas:
                logger.info(f"ensam batch: {by_atlas} are segmented by their label token on {conf['batch_backend']} "
                            f"(ensam_seg in the server would use the atlas route for them)")
        provider = self._provider(task)
        job = BatchJob(
            out=conf["batch_results"] or self._results_folder(datastore, image_ids), weights=provider.weights_path(),
            network_config=provider.network_config, engine_kwargs=dict(provider.engine_kwargs), names=names,
            vocab=vocab, workers=int(request.get("max_workers") or 0),
            gpus_per_worker=float(request.get("gpus_per_worker") or 0),
            device="auto" if conf["batch_backend"] == "ray" else _device(request))  # Ray: the worker's GPU if any

        def progress(rec: dict, n: int, of: int) -> None:
            status = "ok" if rec.get("status") == "ok" else f"error: {rec.get('reason')}"
            took = "done earlier" if rec.get("skipped") else f"{(rec.get('seconds') or {}).get('total', 0):.1f}s"
            logger.info(f"ensam batch: {n}/{of} {rec.get('study')} {status} ({took})")

        manifest_out = run_job(job, studies, backend=conf["batch_backend"], ray_address=conf["ray_address"] or None,
                               progress=False, on_record=progress)
        dicomweb = dicomweb_ref(datastore) is not None
        for entry in manifest_out["studies"]:
            i = entry["study"]
            if entry["status"] != "ok":
                result[i] = {"error": entry.get("reason") or entry["status"]}
                continue
            try:
                result[i] = self._save(datastore, i, entry, job, model, label_tag, dicomweb)
            except Exception as e:  # noqa: BLE001 - one image's failure must not stop the others
                logger.warning(f"ensam batch: {i}: the result could not be saved in the datastore: {e}")
                result[i] = {"error": f"the result could not be saved in the datastore: {e}", "key": entry["key"]}
        ok = sum("error" not in r for r in result.values())
        logger.info(f"ensam batch: finished {ok} ok, {len(result) - ok} failed of {total} in "
                    f"{time.time() - start:.1f}s (results: {job.out})")
        return result

    # ---- pieces --------------------------------------------------------------------------------------------
    @staticmethod
    def _through_task(request: dict, image_ids: List[str], label_tag: str, datastore: Datastore, infer) -> dict:
        """Prompt-free batch on the local backend: one ``infer`` call of the task per image (monailabel saves the
        label); a failed image is recorded and the others go on; one progress line per image."""
        from monailabel.utils.others.generic import remove_file

        base = {k: v for k, v in request.items() if k not in PROMPT_KEYS and k not in ("images", "max_workers",
                                                                                          "gpus_per_worker")}
        known, out = set(datastore.list_images()), {}
        for n, image_id in enumerate(image_ids):
            t0 = time.time()
            try:
                if image_id not in known:
                    raise RequestError(f"image {image_id!r} is not in the datastore", status_code=404)
                r = infer({**base, "image": image_id, "label_tag": label_tag, "session_memory": False,
                           "reset_state": True, "save_label": True}, datastore)
                if r.get("file"):
                    remove_file(r.pop("file"))
                params = r.get("params") or {}
                out[image_id] = {"label": r.get("label"), "params": {
                    k: params[k] for k in ("label_names", "voxels", "structures", "latencies") if k in params}}
                status = "ok"
            except Exception as e:  # noqa: BLE001 - one bad image must not stop the batch
                out[image_id] = {"error": str(e)}
                status = f"error: {e}"
            logger.info(f"ensam batch: {n + 1}/{len(image_ids)} {image_id} {status} ({time.time() - t0:.1f}s)")
        return out

    def _provider(self, task):
        """The engine provider of the model's task (the weights, network and engine settings the server uses)."""
        for t in [task, *self.infers.values()]:
            if t is not None and getattr(t, "provider", None) is not None:
                return t.provider
        raise RequestError("no ensam infer task with an engine is configured", status_code=500)

    def _names(self, request: dict, model: str) -> Tuple[List[str], Dict[str, int], List[str]]:
        """The prompt-free names (request ``labels`` / ``label_names``, else ``ensam_seg``'s defaults), the
        vocabulary of the served weights and the names ``ensam_seg`` routes by atlas; unknown names are a 422."""
        from lib.label_vocab import canonical

        from .ensam_infer import _names

        seg = self.infers.get(model) if hasattr(self.infers.get(model), "vocab") else next(
            (t for t in self.infers.values() if hasattr(t, "vocab") and hasattr(t, "default_labels")), None)
        if seg is None:
            raise RequestError(f"prompt-free batch inference needs ensam_seg (model {model!r} has no vocabulary)")
        vocab = seg.vocab()
        wanted = _names(request.get("labels") or request.get("label_names")) or list(seg.default_labels)
        wanted = list(dict.fromkeys(canonical(w, vocab) for w in wanted))
        unknown = [w for w in wanted if w not in vocab]
        if unknown or not wanted:
            raise RequestError(f"unknown label name(s) {unknown}" if unknown else "no label names to segment",
                               status_code=422)
        routes = seg.routes()[0] if hasattr(seg, "routes") else {}
        by_atlas = [w for w in wanted if (routes.get(w) or {}).get("route", "token") != "token"]
        return wanted, vocab, by_atlas

    @staticmethod
    def _results_folder(datastore: Datastore, image_ids: List[str]) -> str:
        if dicomweb_ref(datastore) is None:
            known = set(datastore.list_images())
            for i in image_ids:
                uri = datastore.get_image_uri(i) if i in known else ""
                if uri:
                    return os.path.join(os.path.dirname(os.path.abspath(uri)), ".ensam-batch")
        from monailabel.config import settings

        return os.path.join(settings.MONAI_LABEL_APP_DIR or os.getcwd(), "batch-results")

    @staticmethod
    def _save(datastore: Datastore, image_id: str, entry: dict, job, model: str, label_tag: str,
              dicomweb: bool) -> dict:
        """The job's result of one image as the REST answer; saved as the image's label in a local datastore (a
        DICOMweb one got it as DICOM SEG from the job)."""
        store = ResultStore(job.out)
        rec = store.done(image_id, entry["key"]) or {}
        names = rec.get("label_names") or entry.get("label_names") or {}
        params = {"label_names": names, "voxels": rec.get("voxels"), "batch": {
            "key": entry["key"], "weights": rec.get("weights"), "weights_sha256": rec.get("weights_sha256"),
            "seconds": rec.get("seconds"), "node": rec.get("node")}}
        out = {"label_names": names, "params": params, "key": entry["key"]}
        if dicomweb:
            out["dicom_seg"] = rec.get("dicom_seg")
            return out
        path = os.path.join(store.results, entry["file"])
        out["label"] = datastore.save_label(image_id, path, label_tag, {"model": model, "params": params})
        return out


def _device(request: dict) -> str:
    """The request's ``device`` (monailabel sends ``cuda`` by default): a GPU only where there is one."""
    from .engine_provider import resolve_device

    d = request.get("device")
    return resolve_device(d[0] if isinstance(d, (list, tuple)) and d else d)
