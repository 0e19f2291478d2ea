"""ASGI request guard: the id rule on the query and session path (400), body size limits (413), JSON bodies
checked before any route parses them."""

from __future__ import annotations

import json
import logging
from typing import Optional

from fastapi import HTTPException
from monailabel.config import settings

from .limits import _DRAIN_BYTES, MAX_BODY_BYTES, MAX_UPLOAD_BYTES
from .rules import _ID_QUERY_KEYS, id_problem

logger = logging.getLogger("ensam.server")


# ---------------------------------------------------------------------------------------------------- size
class BodyTooLarge(HTTPException):
    """Raised from ``receive`` while a route reads a body over the limit (FastAPI passes HTTPException on)."""


class RequestGuard:
    """ASGI middleware (inside CORS, so that browsers read its answers): the id rule on the query and the
    ``/session/{id}`` path (400), the request body size (413, naming the limit) and the bounds of a JSON body
    (depth, finite numbers: 400)."""

    def __init__(self, app):
        self.app = app

    @staticmethod
    def _id_problem(scope) -> Optional[str]:
        from urllib.parse import parse_qsl

        query = scope.get("query_string", b"").decode("latin-1")
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key in _ID_QUERY_KEYS and value:
                problem = id_problem(value, _ID_QUERY_KEYS[key])
                if problem:
                    return problem
        prefix = f"{settings.MONAI_LABEL_API_STR}/session/"
        path = scope.get("path", "")
        if path.startswith(prefix) and path[len(prefix):]:
            return id_problem(path[len(prefix):].rstrip("/"), "session id")
        return None

    @staticmethod
    async def _answer(send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _drain(receive, budget: int) -> None:
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self._id_problem(scope)
        if problem:
            logger.warning(f"rejected request (400): {scope.get('method')} {scope.get('path')}: {problem}")
            await self._drain(receive, _DRAIN_BYTES)
            return await self._answer(send, 400, problem)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        multipart = headers.get("content-type", "").lower().startswith("multipart/")
        limit, env = (MAX_UPLOAD_BYTES, "ENSAM_MAX_UPLOAD_MB") if multipart else (MAX_BODY_BYTES, "ENSAM_MAX_BODY_MB")
        detail = (f"request body too large: at most {limit / 2**20:g} MiB for "
                  f"{'a multipart upload' if multipart else 'this request'} (server setting {env})")
        try:
            declared = int(headers.get("content-length", ""))
        except ValueError:
            declared = None
        if declared is not None and declared > limit:
            logger.warning(f"rejected request (413): {scope.get('method')} {scope.get('path')}: {declared} bytes")
            await self._drain(receive, min(declared, _DRAIN_BYTES))
            return await self._answer(send, 413, detail)

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body", False):
                        await self._drain(receive, _DRAIN_BYTES)
                    logger.warning(f"rejected request (413): {scope.get('method')} {scope.get('path')}: over "
                                   f"{limit} bytes")
                    raise BodyTooLarge(status_code=413, detail=detail)
            return message

        if _is_json(headers.get("content-type", "")):
            return await self._json_body(scope, limited_receive, send, detail)
        return await self.app(scope, limited_receive, send)

    async def _json_body(self, scope, receive, send, too_large: str):
        """A JSON body (train / batch / scoring / active learning requests, which FastAPI parses with Python's
        JSON parser: NaN, Infinity and any depth up to a RecursionError) is read here and checked against the JSON
        bounds (``_json_value``) before any route runs: 400 naming the bound. Text that is not JSON at all goes on
        to FastAPI (its own 422)."""
        from lib.io.json_bounds import JSONBoundsError, loads_bounded  # the app's lib (see the module docstring)

        chunks = []
        while True:
            try:
                message = await receive()
            except BodyTooLarge:
                return await self._answer(send, 413, too_large)
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body.strip():
            try:
                loads_bounded(body, "the JSON request body")
            except JSONBoundsError as e:
                if not e.invalid:
                    logger.warning(f"rejected request (400): {scope.get('method')} {scope.get('path')}: {e}")
                    return await self._answer(send, 400, str(e))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _is_json(content_type: str) -> bool:
    """Whether a Content-Type is JSON as FastAPI reads it (``application/json``, ``application/*+json``)."""
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
