"""Turning a MONAI Label infer request into prompts for the engine, with clear 4xx errors for bad input.

Free of MONAI Label (below the infer tasks, the batch job and the train task, which all read requests with it).

What the clients send (see the shared MONAI Label notes): 3D Slicer ``foreground`` / ``background`` (lists of
``[i, j, k]``), ``roi`` = ``[i0, i1, j0, j1, k0, k1]`` (a pair may be reversed), ``label``, ``reset_state``,
``client_id``; OHIF v3 ``foreground`` / ``background`` or ``points`` + ``point_labels`` (1 fg / 0 bg). ensam also
takes ``boxes`` (a list of ROIs, several objects of the same label in one call) and ``undo``.
All coordinates are voxel indices of the ORIGINAL image.

Limits (what one request may cost): at most ``MAX_POINTS`` clicks (foreground, background and ``points``
together) and ``MAX_BOXES`` boxes (``roi`` and ``boxes`` together; each box is one object the engine encodes on
its own). More is refused with 413 before anything is computed.
"""

from __future__ import annotations

import json
import math
from typing import Any, List, Sequence, Tuple

import numpy as np

from .errors import RequestError  # noqa: F401 (re-exported: the infer tasks raise it)
from .geometry import Prompts, PromptError, check_prompts  # noqa: F401 (Prompts re-exported)

MAX_POINTS = 256  # clicks per request
MAX_BOXES = 32  # boxes (= objects, one encoding each) per request


def first_value(v: Any) -> Any:
    """A request value that monailabel or a client may send as a one-element list (``client_id``, ``label``,
    ``device``): its first element; anything else as it is."""
    return v[0] if isinstance(v, (list, tuple)) and v else v


def _check_count(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise RequestError(f"too many {what}: at most {limit} {what} per request, got {n}", status_code=413)


TRUE_WORDS = {"1", "true", "yes", "on", "y", "t"}
FALSE_WORDS = {"0", "false", "no", "off", "n", "f", "", "none", "null"}


def parse_bool(value: Any, name: str = "flag", default: bool = False) -> bool:
    """THE boolean of a request or config value (infer, train, scoring, ``--conf``): bools, numbers, the words in
    ``TRUE_WORDS`` / ``FALSE_WORDS`` (any case), a list's first item; None -> ``default``. Anything else (a typo
    like ``"flase"``) is a ``RequestError`` (400) naming ``name``, never a silent False."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in TRUE_WORDS:
            return True
        if v in FALSE_WORDS:
            return False
    if isinstance(value, (list, tuple)) and value:  # Slicer may echo a list-valued config
        return parse_bool(value[0], name, default)
    raise RequestError(f"'{name}' must be true or false, got {value!r}")


def _maybe_json(value: Any, name: str) -> Any:
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        try:
            return json.loads(s)
        except json.JSONDecodeError as e:
            raise RequestError(f"'{name}' is not valid JSON: {value!r} ({e.msg})") from None
    return value


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise RequestError(f"{what}: expected a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise RequestError(f"{what}: expected a finite number, got {v!r}")
    return f


def _point_list(value: Any, name: str) -> List[List[float]]:
    value = _maybe_json(value, name)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"'{name}' must be a list of [i, j, k] voxel indices, got {value!r}")
    if len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        value = [value]  # a single point given flat
    _check_count(len(value), MAX_POINTS, "points")
    pts = []
    for n, p in enumerate(value):
        if not isinstance(p, (list, tuple)) or len(p) != 3:
            raise RequestError(f"'{name}'[{n}] must be a voxel index [i, j, k] (3 numbers), got {p!r}")
        pts.append([_number(c, f"'{name}'[{n}]") for c in p])
    return pts


def _box(value: Any, name: str) -> List[float]:
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in value
    ):
        value = [c for pair in value for c in pair]  # [[i0, i1], [j0, j1], [k0, k1]]
    if not isinstance(value, (list, tuple)) or len(value) != 6:
        raise RequestError(
            f"'{name}' must be [i0, i1, j0, j1, k0, k1] (6 voxel indices: a min/max pair per axis), got {value!r}"
        )
    return [_number(c, f"'{name}'") for c in value]


def parse_prompts(request: dict) -> Tuple[List[List[float]], List[int], List[List[float]]]:
    """Read every prompt key of ``request`` (no image needed): (points, labels, raw boxes). Raises RequestError."""
    points: List[List[float]] = []
    labels: List[int] = []
    for key, lab in (("foreground", 1), ("background", 0)):
        pts = _point_list(request.get(key), key)
        points += pts
        labels += [lab] * len(pts)

    if request.get("points") is not None:
        pts = _point_list(request.get("points"), "points")
        pl = _maybe_json(request.get("point_labels"), "point_labels")
        if pl is None:
            pl = [1] * len(pts)
        if not isinstance(pl, (list, tuple)) or len(pl) != len(pts):
            raise RequestError(
                f"'point_labels' must be a list with one entry (1 foreground / 0 background) per point: "
                f"{len(pts)} points, point_labels={pl!r}"
            )
        for n, v in enumerate(pl):
            v = _number(v, f"'point_labels'[{n}]")
            if v not in (0.0, 1.0):
                raise RequestError(f"'point_labels'[{n}] must be 1 (foreground) or 0 (background), got {pl[n]!r}")
            labels.append(int(v))
        points += pts
    _check_count(len(points), MAX_POINTS, "points")

    boxes: List[List[float]] = []
    roi = _maybe_json(request.get("roi"), "roi")
    if roi is not None and not (isinstance(roi, (list, tuple)) and len(roi) == 0):
        boxes.append(_box(roi, "roi"))
    raw_boxes = _maybe_json(request.get("boxes"), "boxes")
    if raw_boxes is not None:
        if not isinstance(raw_boxes, (list, tuple)):
            raise RequestError(f"'boxes' must be a list of [i0, i1, j0, j1, k0, k1], got {raw_boxes!r}")
        if len(raw_boxes) == 6 and all(isinstance(v, (int, float)) for v in raw_boxes):
            raw_boxes = [raw_boxes]
        _check_count(len(boxes) + len(raw_boxes), MAX_BOXES, "boxes")
        for n, b in enumerate(raw_boxes):
            boxes.append(_box(b, f"boxes[{n}]"))
    return points, labels, boxes


def validate_prompts(
    points: Sequence[Sequence[float]],
    labels: Sequence[int],
    boxes: Sequence[Sequence[float]],
    shape: Sequence[int],
) -> Prompts:
    """Check prompts against the image ``shape`` with :func:`lib.geometry.check_prompts` (THE rule, also the
    engine's): clicks must lie inside (422 otherwise); boxes are sorted per axis, clipped to the image, and refused
    (422) only when they miss the image entirely. The result goes to the engine as it is (checked once)."""
    try:
        return check_prompts(points, labels, boxes, shape)
    except PromptError as e:
        raise RequestError(str(e), status_code=422) from None
