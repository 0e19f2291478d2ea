"""MONAI Label infer task ``ensam_scribbles`` (type ``scribbles``): painted strokes as prompts of the same network.

The request, as 3D Slicer's MONAI Label module sends it (details and sources in :mod:`lib.prompts.strokes`):
``POST /infer/ensam_scribbles?image=<id>`` with the multipart file ``label`` = every segment of the scene exported
as one labelmap on the image's grid (background strokes 2 and foreground strokes 3 by default; ``label_info`` =
``[{"name", "id"}]`` names the values), and ``params`` with ``label_info``, ``selected_label_name`` (the segment
the strokes edit), ``roi`` (``[]`` or ``[i0, i1, j0, j1, k0, k1]``), ``client_id``, ``result_extension``,
``result_dtype``. monailabel stores the upload in a temporary file and passes its path as ``request["label"]``.

What happens: the stroke volume is checked (a readable 3D volume of the image's shape and grid, only known values,
at least one foreground stroke unless it corrects a previous result), turned into foreground / background points
sampled along the strokes (:func:`lib.prompts.strokes.strokes_to_prompts`), and the request is handed to the
interactive task :class:`lib.infers.ensam_infer.EnsamInteractive` with ``label`` = the edited segment and the points
added: its session store gives the previous result of that (client, image, label) (shared with ``ensam`` clicks), the
``roi`` is its box, and it writes the result, records the step (undo) and answers. Bad strokes are a 4xx before
anything runs, so a refused request changes no session.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ..geometry import spacing_from_affine
from ..prompts.strokes import StrokeError, strokes_to_prompts, stroke_values
from .ensam_infer import EnsamInteractive, keeps_session, request_session_key
from ..io.imageio import load_volume, volume_shape, volume_shape_of_upload
from lib.request_parsing import RequestError, first_value, parse_bool

HOW = ("send the strokes as the multipart file 'label' of POST /infer/ensam_scribbles (a labelmap on the image's "
       "grid: background strokes 2, foreground strokes 3, or the values 'label_info' gives 'background_scribbles' "
       "and 'foreground_scribbles'), as 3D Slicer's Scribbles section does")


def _label_info(value: Any) -> Optional[list]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as e:
            raise RequestError(f"'label_info' is not valid JSON: {value!r} ({e.msg})") from None
    return value


def _uploaded_path(request: dict) -> str:
    """The stroke volume's file: only monailabel's temporary copy of the upload (a path given in ``params`` would
    let a client make the server read any file)."""
    path = request.get("label")
    if not isinstance(path, str) or not path or not os.path.isfile(path):
        raise RequestError(f"no stroke volume: {HOW}")
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(tempfile.gettempdir()):
        raise RequestError(f"'label' must be an uploaded file, not a path or a name: {HOW}")
    return path


def _same_grid(affine_a: np.ndarray, affine_b: np.ndarray, shape) -> float:
    """Largest distance (mm) between where two affines put the corners of a volume of ``shape``."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    return float(np.abs(corners @ np.asarray(affine_a).T - corners @ np.asarray(affine_b).T)[:, :3].max())


class EnsamScribbles(InferTask):
    """Strokes (and the previous result, and an optional ROI) -> one binary mask, through ``interactive``."""

    def __init__(self, interactive: EnsamInteractive,
                 description: str = "ENSAM with scribbles: foreground/background strokes (3D Slicer's Scribbles), "
                                    "the previous result and an optional ROI",
                 config: Optional[dict] = None):
        cfg = dict(interactive.config())  # the same options (device) as the interactive task
        cfg.update(config or {})
        super().__init__(type=InferType.SCRIBBLES, labels=list(interactive.labels), dimension=3,
                         description=description, config=cfg)
        self.interactive = interactive

    def is_valid(self) -> bool:
        return self.interactive.is_valid()

    def get_path(self, validate=True):
        return self.interactive.get_path(validate)

    def __call__(self, request) -> Tuple[Optional[str], Dict]:
        segment = first_value(request.get("selected_label_name")) or ""
        if not isinstance(segment, str):
            raise RequestError(f"'selected_label_name' must be the name of the segment the strokes edit, got "
                               f"{segment!r}")
        if parse_bool(request.get("undo"), "undo"):  # undo needs no strokes: the interactive task's own step
            return self.interactive({**request, "label": segment})
        if request.get("points") is not None:
            raise RequestError("ensam_scribbles takes strokes (and 'foreground' / 'background' clicks), not "
                               "'points'")
        stroke_file = _uploaded_path(request)
        image = request.get("image")
        if not isinstance(image, str) or not os.path.exists(image):
            raise RequestError(f"image not found: {request.get('_image_id') or image!r}", status_code=404)
        vol = self.interactive.volumes.get(image)
        strokes = self._read_strokes(stroke_file, vol)
        spacing = spacing_from_affine(vol.affine)
        label_info = _label_info(request.get("label_info"))
        try:
            prompts = strokes_to_prompts(strokes, spacing, label_info)
            fg_value, bg_value, _ = stroke_values(label_info)
        except StrokeError as e:
            raise RequestError(str(e), status_code=422) from None
        if prompts.fg_voxels == 0 and prompts.bg_voxels == 0:
            raise RequestError(f"the stroke volume holds no stroke (no voxel of value {fg_value} or {bg_value}): "
                               f"paint at least one foreground stroke", status_code=422)
        if prompts.fg_voxels == 0 and not self._has_previous(request, image, segment):
            raise RequestError(
                f"no foreground stroke (value {fg_value}): paint at least one; background strokes (value {bg_value}) "
                f"alone only correct a previous result of this client and segment ({segment!r}), and there is none",
                status_code=422)
        req = {k: v for k, v in request.items() if k not in ("label_info", "selected_label_name")}
        req.update({"label": segment, "points": prompts.points.tolist(), "point_labels":
                    prompts.point_labels.tolist()})
        out, res = self.interactive(req)
        res["strokes"] = {**prompts.summary(), "foreground_value": fg_value, "background_value": bg_value}
        return out, res

    def _read_strokes(self, path: str, vol) -> np.ndarray:
        name = "stroke volume"
        try:
            dims = tuple(volume_shape(path))
        except Exception:  # noqa: BLE001 - unreadable: volume_shape_of_upload below says why, as a 400
            dims = None
        if dims is not None and dims != tuple(vol.shape):
            raise RequestError(f"the {name}'s shape {list(dims)} differs from the image's {list(vol.shape)}: the "
                               f"strokes must be a labelmap on the image's grid", status_code=422)
        volume_shape_of_upload(path, what=name, max_voxels=int(np.prod(vol.shape)))
        sv = load_volume(path)
        if tuple(sv.shape) != tuple(vol.shape):
            raise RequestError(f"the {name}'s shape {list(sv.shape)} differs from the image's {list(vol.shape)}",
                               status_code=422)
        off = _same_grid(sv.affine, vol.affine, vol.shape)
        if off > 0.5 * float(spacing_from_affine(vol.affine).min()):
            raise RequestError(f"the {name} is not on the image's grid: its affine puts the volume's corners up to "
                               f"{off:.2f} mm away from the image's", status_code=422)
        return np.asarray(sv.array)

    def _has_previous(self, request: dict, image: str, segment: str) -> bool:
        """Whether the interactive task will see a previous result for this request (its session rule)."""
        if parse_bool(request.get("reset_state"), "reset_state") or not keeps_session(request, segment):
            return False
        return self.interactive.sessions.depth(request_session_key(request, image, segment)) > 0
