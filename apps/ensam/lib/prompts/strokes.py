"""Scribbles (painted strokes) -> prompts of the ensam network, without a server.

What a client sends (read from the sources, not guessed):

* 3D Slicer's MONAI Label module (``plugins/slicer/MONAILabel/MONAILabel.py`` in Project-MONAI/MONAILabel, read at
  commit 058ddfc, ``onUpdateScribbles`` / ``ensureScribblesLayersPresent``): the strokes are two segments,
  ``background_scribbles`` and ``foreground_scribbles``, added after the segments already there. On *Update* the
  module exports EVERY segment of the segmentation into one labelmap on the image's grid
  (``ExportSegmentsToLabelmapNode(..., referenceVolumeNode)``), value = position of the segment + 1, saves it as
  ``.nii.gz`` (its file-extension setting) and uploads it as the multipart file ``label`` of ``POST /infer/<model>``
  (``MONAILabelLib/client.py``: ``files = {"label": label_in}``). ``params`` hold the model's config (first value of
  each list), ``roi`` (``[i0, i1, j0, j1, k0, k1]`` from the scribbles ROI node, ``[]`` when none is placed),
  ``label_info`` = ``[{"name": segment name, "id": position + 1}, ...]``, ``selected_label_name`` (the segment the
  strokes edit), ``client_id``, ``result_extension=".nrrd"`` and ``result_dtype="uint8"``. The answer's value 1 is
  imported into ``selected_label_name``. With one segment before the strokes, background strokes are 2 and
  foreground strokes 3: monailabel's default (``scribbles_bg_label=2``, ``scribbles_fg_label=3`` in
  ``monailabel/scribbles/transforms.py``, which reads the real ids from ``label_info`` by those two names, as
  :func:`stroke_values` does).
* monailabel 0.8.5 (``monailabel/endpoints/infer.py``, ``run_inference``): the ``label`` upload is written to a
  temporary file (a ``.bin`` upload, OHIF's raw voxels, is first turned into a volume on the image's grid) and its
  path becomes ``request["label"]`` before ``params`` are merged; ``InferType.SCRIBBLES == "scribbles"``.

How strokes become prompts (:func:`strokes_to_prompts`): the painted voxels of each kind are thinned to their
centre line (``skimage.morphology.skeletonize``; a brush stroke is several voxels wide) and points are sampled
along it by farthest-point sampling in millimetres: every stroke gets points, at most ``step_mm`` apart where the
budget allows, at most ``max_points`` per kind. They are given to the network as foreground / background clicks:
each is a point token AND a Gaussian blob in the dense foreground / background click map (``click_sigma`` model
voxels, max over points), so points this close draw the stroke itself into the dense map as a blurred line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from ..geometry import mask_bbox

__all__ = ["BG_STROKE", "FG_STROKE", "BG_NAME", "FG_NAME", "StrokeError", "StrokePrompts", "stroke_values",
           "decode_strokes", "stroke_points", "strokes_to_prompts", "prompts_from_masks"]

BG_STROKE, FG_STROKE = 2, 3  # monailabel's convention (scribbles_bg_label / scribbles_fg_label)
BG_NAME, FG_NAME = "background_scribbles", "foreground_scribbles"  # the segment names 3D Slicer uses
STEP_MM = 5.0  # largest gap between sampled points along a stroke (when the budget allows)
MAX_POINTS = 48  # sampled points per kind (foreground / background): request_parsing.MAX_POINTS is 256 in all


class StrokeError(ValueError):
    """A stroke volume that cannot be used (unknown values, bad ``label_info``, ...); the message says why."""


@dataclass
class StrokePrompts:
    points: np.ndarray  # (N, 3) int64 voxel indices [i, j, k]: foreground points first, then background
    point_labels: np.ndarray  # (N,) int64, 1 foreground / 0 background
    fg_voxels: int  # painted voxels of each kind
    bg_voxels: int

    @property
    def n_fg(self) -> int:
        return int(np.count_nonzero(self.point_labels == 1))

    @property
    def n_bg(self) -> int:
        return int(np.count_nonzero(self.point_labels == 0))

    def summary(self) -> dict:
        return {"foreground_voxels": self.fg_voxels, "background_voxels": self.bg_voxels,
                "foreground_points": self.n_fg, "background_points": self.n_bg}


def _as_int_id(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or float(v) != int(v):
        raise StrokeError(f"{where}: 'id' must be an integer label value, got {v!r}")
    return int(v)


def stroke_values(label_info: Optional[Sequence[dict]] = None) -> Tuple[int, int, Dict[int, str]]:
    """(foreground value, background value, {every allowed non-zero value: its name}) of a stroke volume.

    ``label_info``: what 3D Slicer sends, ``[{"name": ..., "id": ...}, ...]``; the entries named
    ``foreground_scribbles`` / ``background_scribbles`` give the stroke values (3 / 2 when absent); every other
    entry is a segment exported with the strokes (allowed, not a stroke). Without ``label_info`` the allowed values
    are 0, the two stroke values and 1 (the segment being edited, as a one-segment Slicer scene exports it)."""
    fg, bg = FG_STROKE, BG_STROKE
    names: Dict[int, str] = {}
    if label_info in (None, [], ()):
        return fg, bg, {1: "segment", bg: BG_NAME, fg: FG_NAME}
    if not isinstance(label_info, (list, tuple)):
        raise StrokeError(f"'label_info' must be a list of {{'name': ..., 'id': ...}}, got {label_info!r}")
    for n, entry in enumerate(label_info):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or "id" not in entry:
            raise StrokeError(f"'label_info'[{n}] must be {{'name': <segment name>, 'id': <label value>}}, got "
                              f"{entry!r}")
        value = _as_int_id(entry["id"], f"'label_info'[{n}]")
        if value <= 0:
            raise StrokeError(f"'label_info'[{n}]: 'id' must be a positive label value, got {value}")
        if value in names and names[value] != entry["name"]:
            raise StrokeError(f"'label_info' gives value {value} to both {names[value]!r} and {entry['name']!r}")
        names[value] = entry["name"]
        if entry["name"] == FG_NAME:
            fg = value
        elif entry["name"] == BG_NAME:
            bg = value
    if fg == bg:
        raise StrokeError(f"foreground and background strokes have the same value {fg}")
    names.setdefault(fg, FG_NAME)
    names.setdefault(bg, BG_NAME)
    return fg, bg, names


def decode_strokes(volume: np.ndarray, label_info: Optional[Sequence[dict]] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """(foreground strokes, background strokes) as boolean arrays of a stroke volume's shape.

    Raises :class:`StrokeError` for a volume that is not 3D or holds a value :func:`stroke_values` does not allow
    (non-integer values included), naming them."""
    v = np.asarray(volume)
    if v.ndim != 3:
        raise StrokeError(f"the stroke volume must be 3D, got shape {list(v.shape)}")
    if not (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating) or v.dtype == np.bool_):
        raise StrokeError(f"the stroke volume has voxels of type {v.dtype}, not label values")
    fg, bg, names = stroke_values(label_info)
    present = np.unique(v)
    unknown = [x for x in present.tolist() if x != 0 and (x != int(x) or int(x) not in names)]
    if unknown:
        shown = ", ".join(f"{x:g}" for x in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        allowed = ", ".join(f"{k} ({n})" for k, n in sorted(names.items()))
        raise StrokeError(f"the stroke volume holds unknown value(s) {shown}; allowed: 0 (nothing), {allowed}")
    return v == fg, v == bg


def _centre_lines(strokes: np.ndarray) -> np.ndarray:
    """Voxel indices ``(M, 3)`` of the strokes' centre lines: per 26-connected stroke, its skeleton in its plane
    when it is one voxel thick along an axis (a stroke painted with Slicer's 2D brush in one slice), else its 3D
    skeleton (Lee); a stroke whose skeleton comes out empty (Lee's 3D thinning deletes some even-width shapes)
    keeps all its voxels."""
    labels, n = ndimage.label(strokes, structure=np.ones((3, 3, 3), dtype=bool))
    out = []
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == idx
        flat = [a for a in range(3) if comp.shape[a] == 1]
        if flat:
            plane = np.take(comp, 0, axis=flat[0])
            line = np.expand_dims(skeletonize(np.pad(plane, 1))[1:-1, 1:-1], flat[0])
        else:
            line = skeletonize(np.pad(comp, 1))[1:-1, 1:-1, 1:-1]
        line &= comp
        pts = np.argwhere(line if line.any() else comp)
        out.append(pts + np.array([x.start for x in sl]))
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 3), dtype=np.int64)


def stroke_points(strokes: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), step_mm: float = STEP_MM,
                  max_points: int = MAX_POINTS) -> np.ndarray:
    """Points along painted strokes: ``(N, 3)`` int64 voxel indices, ``N <= max_points``.

    The strokes (boolean ``(X, Y, Z)``) are thinned to their centre lines (:func:`_centre_lines`), then
    farthest-point sampling in millimetres (``spacing``) picks points: the first one nearest the centre lines'
    mean, each next one the centre-line voxel farthest from those already picked, until every centre-line voxel is
    within ``step_mm / 2`` of a picked one (neighbouring points ``step_mm / 2`` to ``step_mm`` apart) or
    ``max_points`` are picked. Deterministic; each separate stroke gets points early (it is far from the
    others)."""
    s = np.asarray(strokes) != 0
    if s.ndim != 3:
        raise StrokeError(f"strokes must be a 3D mask, got shape {list(s.shape)}")
    if max_points <= 0 or not s.any():
        return np.zeros((0, 3), dtype=np.int64)
    box = mask_bbox(s)
    cand = _centre_lines(s[tuple(slice(box[2 * a], box[2 * a + 1] + 1) for a in range(3))]) + box[0::2]
    mm = cand * np.asarray(spacing, dtype=float)[None]
    first = int(np.argmin(((mm - mm.mean(0)) ** 2).sum(1)))
    picked = [first]
    dist = np.sqrt(((mm - mm[first]) ** 2).sum(1))
    while len(picked) < max_points:
        far = int(np.argmax(dist))
        if dist[far] <= step_mm / 2:
            break
        picked.append(far)
        dist = np.minimum(dist, np.sqrt(((mm - mm[far]) ** 2).sum(1)))
    return cand[picked].astype(np.int64)


def strokes_to_prompts(volume: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                       label_info: Optional[Sequence[dict]] = None, step_mm: float = STEP_MM,
                       max_points: int = MAX_POINTS) -> StrokePrompts:
    """A stroke volume (values as :func:`decode_strokes` reads them) -> foreground and background points sampled
    along the strokes (:func:`stroke_points`, at most ``max_points`` of each kind). Raises :class:`StrokeError`
    for unknown values; an empty result (no stroke at all) is for the caller to judge."""
    fg, bg = decode_strokes(volume, label_info)
    return prompts_from_masks(fg, bg, spacing, step_mm, max_points)


def prompts_from_masks(fg: np.ndarray, bg: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                       step_mm: float = STEP_MM, max_points: int = MAX_POINTS) -> StrokePrompts:
    """Foreground / background stroke masks -> :class:`StrokePrompts` (foreground points first)."""
    pf = stroke_points(fg, spacing, step_mm, max_points)
    pb = stroke_points(bg, spacing, step_mm, max_points)
    return StrokePrompts(np.concatenate([pf, pb]).reshape(-1, 3).astype(np.int64),
                         np.concatenate([np.ones(len(pf), np.int64), np.zeros(len(pb), np.int64)]),
                         int(np.count_nonzero(fg)), int(np.count_nonzero(bg)))
