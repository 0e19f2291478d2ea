"""Bounds on the JSON the server takes and stores (issue 25, #3 / #4 / #8).

Python's JSON parser reads up to ~1000 levels of nesting (RecursionError beyond), ``NaN`` / ``Infinity`` literals
and ``1e999`` (a float ``inf``); pydantic, which reads the datastore index ``datastore_v2.json`` at start-up, stops
at 200 levels, and a JSON answer with NaN is a 500 (Starlette does not write NaN). So image info nested 250 deep,
once stored, kept the server from ever starting again, and a NaN training budget made ``/info`` a 500. Every JSON
value the server takes is therefore at most :data:`MAX_JSON_DEPTH` levels deep (objects and lists) and holds
finite numbers only; :func:`loads_bounded` parses a text within those bounds (no recursion error escapes),
:func:`json_problem` checks a value already parsed (iteratively: any depth), :func:`finite_or_none` sanitises a
value read back from a file (non-finite numbers become ``None``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

__all__ = ["MAX_JSON_DEPTH", "JSON_RULE", "JSONBoundsError", "json_problem", "loads_bounded", "finite_or_none"]

MAX_JSON_DEPTH = 32
JSON_RULE = (f"JSON values are at most {MAX_JSON_DEPTH} levels deep (objects and lists) and hold finite numbers "
             f"only (no NaN, Infinity or 1e999)")


class JSONBoundsError(ValueError):
    """A JSON text outside the bounds (``invalid`` False) or not JSON at all (``invalid`` True)."""

    def __init__(self, message: str, invalid: bool = False):
        super().__init__(message)
        self.invalid = invalid


def json_problem(value: Any, field: str, max_depth: int = MAX_JSON_DEPTH) -> Optional[str]:
    """Why the parsed JSON ``value`` (named ``field`` in the message) breaks the bounds, or None. Iterative: a value
    of any depth is checked without recursion."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            if depth > max_depth:
                return f"{field} is nested more than {max_depth} levels deep: {JSON_RULE}"
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
        elif isinstance(v, float) and not math.isfinite(v):
            return f"{field} holds a number that is not finite ({v}): {JSON_RULE}"
    return None


def loads_bounded(text: Any, field: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)`` within the bounds; raises :class:`JSONBoundsError` naming ``field`` and the bound."""
    def constant(name):
        raise JSONBoundsError(f"{field} holds {name}, which is not a finite number: {JSON_RULE}")

    def number(s):
        v = float(s)
        if not math.isfinite(v):
            raise JSONBoundsError(f"{field} holds the number {s[:40]}, which is not finite as a float: {JSON_RULE}")
        return v

    try:
        value = json.loads(text, parse_constant=constant, parse_float=number)
    except JSONBoundsError:
        raise
    except RecursionError:
        raise JSONBoundsError(f"{field} is nested too deep to be read: {JSON_RULE}") from None
    except json.JSONDecodeError as e:
        raise JSONBoundsError(f"{field} is not valid JSON: {e}", invalid=True) from None
    except (ValueError, TypeError) as e:  # e.g. an integer of more than 4300 digits, bytes that are not UTF-8
        raise JSONBoundsError(f"{field} cannot be read as JSON: {e}", invalid=True) from None
    problem = json_problem(value, field, max_depth)
    if problem:
        raise JSONBoundsError(problem)
    return value


def finite_or_none(value: Any, _depth: int = 0) -> Any:
    """A copy of the JSON value with every non-finite number replaced by None (containers nested deeper than 64
    levels are dropped: None)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dict, list, tuple)):
        if _depth >= 64:
            return None
        if isinstance(value, dict):
            return {k: finite_or_none(v, _depth + 1) for k, v in value.items()}
        return [finite_or_none(v, _depth + 1) for v in value]
    return value
