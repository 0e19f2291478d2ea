"""MONAI Label infer task ``ensam`` (interactive, type deepgrow) and the request helpers the other infer tasks share
(``ensam_seg`` is :mod:`lib.infers.seg_by_example`, ``ensam_scribbles`` :mod:`lib.infers.scribbles`).

It subclasses monailabel's :class:`InferTask` and hands the work to :class:`lib.engine.EnsamEngine` through a shared
:class:`EngineProvider`: the image is loaded as stored (no reorientation, the engine owns the geometry), the result
is written on the original grid (NIfTI by default; ``.nrrd`` etc. when the client asks ``result_extension``).
Bad input raises :class:`RequestError` (a ValueError carrying an HTTP status) before anything changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.others.generic import device_list

from .engine_provider import EngineProvider, resolve_device
from ..io.imageio import RESULT_EXTENSIONS, VolumeCache, write_mask
from lib.request_parsing import RequestError, first_value, parse_bool, parse_prompts, validate_prompts
from ..session import SessionRegistry, session_key

logger = logging.getLogger(__name__)


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays -> plain Python, for the result JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float):
        return round(obj, 4)
    return obj


def _load(volumes: VolumeCache, request: dict):
    """(image path, volume): the image's existence is checked here only, by the volume cache's stat (404)."""
    image = request.get("image")
    if not isinstance(image, str):
        raise RequestError("ensam needs an image id from the datastore, an uploaded file, or a session id")
    try:
        return image, volumes.get(image)
    except FileNotFoundError:
        raise RequestError(f"image not found: {request.get('_image_id') or image!r}", status_code=404) from None


def keeps_session(request: dict, label: str) -> bool:
    """THE session rule: whether a request reads and records its session. The previous result is only meaningful
    when the request says whose and which object it is: 3D Slicer sends the segment name (label) and its client id;
    OHIF sends neither (and re-sends every click of the current label each time), so its requests stand alone
    instead of mixing labels. ``session_memory`` says it outright."""
    client_id = first_value(request.get("client_id")) or ""
    return parse_bool(request.get("session_memory"), "session_memory", default=bool(label or client_id))


def request_session_key(request: dict, image_path: str, label: str) -> tuple:
    """The session of a request on ``image_path`` (its real path: one session whatever the path's spelling)."""
    return session_key(first_value(request.get("client_id")) or "", os.path.realpath(image_path), label)


def _result_format(request: dict) -> Tuple[str, Optional[str], bool]:
    ext = first_value(request.get("result_extension")) or ".nii.gz"
    if not isinstance(ext, str) or not ext.strip():
        ext = ".nii.gz"
    allowed = RESULT_EXTENSIONS  # one file each (.mhd is refused: its .raw voxel file was left in /tmp)
    ext = ext.strip() if ext.strip().startswith(".") else "." + ext.strip()
    if ext.lower() not in allowed:
        raise RequestError(f"result_extension {ext!r} is not supported; use one of {', '.join(allowed)}")
    dtype = first_value(request.get("result_dtype")) or "uint8"
    compress = parse_bool(request.get("result_compress"), "result_compress", default=True)
    return ext, dtype, compress


class _EnsamTask(InferTask):
    def __init__(self, provider: EngineProvider, volumes: VolumeCache, type, labels, description, config=None):
        cfg = {"device": device_list()}  # clients send the first entry; no GPU -> CPU
        cfg.update(config or {})
        super().__init__(type=type, labels=labels, dimension=3, description=description, config=cfg)
        self.provider = provider
        self.volumes = volumes

    def is_valid(self) -> bool:
        return True  # the network can always be built; without weights it is untrained (logged at load)

    def get_path(self, validate=True):
        p = self.provider.weights_path()
        return p if p or not validate else None

    def _device(self, request: dict) -> str:
        return resolve_device(first_value(request.get("device")))

    @staticmethod
    def _write(mask: np.ndarray, vol, fmt: Tuple[str, Optional[str], bool]) -> str:
        ext, dtype, compress = fmt
        return write_mask(mask, vol, extension=ext, dtype=dtype, compress=compress)


class EnsamInteractive(_EnsamTask):
    """Clicks, boxes and the previous result -> one binary mask (deepgrow-type task)."""

    def __init__(
        self,
        provider: EngineProvider,
        volumes: VolumeCache,
        sessions: SessionRegistry,
        label_names: Sequence[str] = (),
        description: str = "ENSAM interactive 3D segmentation: clicks, boxes (ROI) and the previous result",
        config: Optional[dict] = None,
    ):
        # reset_state / undo are request keys, not options: 3D Slicer sends every option with every click
        super().__init__(provider, volumes, InferType.DEEPGROW, list(label_names), description, dict(config or {}))
        self.sessions = sessions

    def __call__(self, request) -> Tuple[Optional[str], Dict]:
        """The click path: request -> prompts (parsed here, checked once by ``geometry.check_prompts``) -> the
        session's step (:meth:`lib.session.InteractiveSession.add_prompts`: previous answer, engine, record) ->
        the answer file, with the time split in the JSON."""
        clock = _Clock()
        label = first_value(request.get("label")) or ""
        if not isinstance(label, str):
            label = str(label)
        undo = parse_bool(request.get("undo"), "undo")
        reset = parse_bool(request.get("reset_state"), "reset_state")
        keep_session = keeps_session(request, label)
        points, plabels, boxes = parse_prompts(request)  # malformed input fails before the image is read
        fmt = _result_format(request)

        image_path, vol = _load(self.volumes, request)
        clock.lap("load")
        skey = request_session_key(request, image_path, label)

        if undo:
            if points or boxes:
                raise RequestError("'undo' takes no prompts: send it alone to restore the previous result")
            with self.sessions.locked(skey) as session:  # after the session's click in flight, if any
                try:
                    mask, depth = session.peek_undo()
                except KeyError:
                    raise RequestError(f"nothing to undo for client {skey[0]!r}, label {label!r} on this image",
                                       status_code=409) from None
                mask = mask if mask is not None else np.zeros(vol.shape, dtype=np.uint8)
                out = self._write(mask, vol, fmt)
                clock.lap("write")
                session.undo()  # only once the answer exists
            return out, self._result(label, mask, clock, depth, {"undo": True})

        prompts = validate_prompts(points, plabels, boxes, vol.shape)
        if prompts.empty:
            raise RequestError(
                "no prompt: give at least one click ('foreground'/'background' or 'points'+'point_labels'), "
                "an 'roi' [i0, i1, j0, j1, k0, k1] or 'boxes'"
            )
        device = self._device(request)
        engine = self.provider.get(device)
        clock.lap("prompt")
        written = []

        def write(mask: np.ndarray) -> None:  # the answer file, before the session records the step
            written.append(self._write(mask, vol, fmt))
            clock.lap("write")

        # one step per session at a time (a concurrent click of the same session waits and then builds on this
        # one); reset_state applies only on success. Requests without session memory (OHIF's) read and write no
        # session: they do not wait for each other.
        with self.sessions.locked(skey) if keep_session else \
                contextlib.nullcontext(self.sessions.transient(skey)) as session:
            mask, info = session.add_prompts(engine, vol, prompts, reset=reset, lap=clock.lap, before_record=write,
                                             device_lock=self.provider.device_lock(device))
            depth = session.depth
            if reset and not keep_session:
                self.sessions.reset(skey)
            clock.lap("session")
        engine_info = _jsonable({k: v for k, v in info.items() if k != "previous_mask"})
        extra = {"prompts": prompts.summary(), "previous_mask": info["previous_mask"], "reset_state": reset,
                 "engine": engine_info}
        return written[0], self._result(label, mask, clock, depth, extra, engine)

    def _result(self, label, mask, clock: "_Clock", depth, extra, engine=None) -> Dict:
        res = {
            "label_names": {label or "ensam": 1},
            "voxels": int(np.count_nonzero(mask)),
            "session": {"step": depth, "can_undo": depth > 0},
            "latencies": clock.split((extra.get("engine") or {})),
        }
        res.update(self.provider.weights_info(engine))
        res.update(extra)
        return res


class _Clock:
    """Where one request's time went: ``lap(name)`` adds the time since the previous lap to ``name``."""

    def __init__(self):
        self.t0 = self.last = time.perf_counter()
        self.laps: Dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def split(self, engine_info: Optional[dict] = None) -> Dict[str, float]:
        """The answer's ``latencies``: load, prompt, session, wait, infer (of which the engine's encode, decode,
        paste, cut), write, total; and the older pre / post (load; session + write after the engine)."""
        lap = self.laps.get
        out = {k: round(lap(k, 0.0), 4) for k in ("load", "prompt", "session", "wait", "infer", "write")}
        for k in ("encode", "decode", "paste", "cut"):  # "cut": the boundary cut, which runs on every answer
            out[k] = round(float((engine_info or {}).get(f"{k}_s", 0.0)), 4)
        out["pre"] = out["load"]
        out["post"] = round(lap("write", 0.0) + lap("session", 0.0), 4)
        out["total"] = round(time.perf_counter() - self.t0, 4)
        return out


def _names(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [w.strip() for w in value.split(",") if w.strip()]
    if isinstance(value, dict):
        return [str(k) for k in value]
    if isinstance(value, (list, tuple)):
        return [str(w).strip() for w in value if str(w).strip()]
    raise RequestError(f"'labels' must be a comma-separated string or a list of names, got {value!r}")
