"""Which exceptions are the client's fault: the 4xx answer of a request error (ensam's RequestError and
PromptError by module and class name, monailabel's own not-found / invalid-input errors), a 500 with its traceback
for everything else. One mapping, :func:`http_error_for`, used in two places: ensam's routes are decorated with
:func:`answers` (a route just raises: ``RequestError``, ``PromptError``, monailabel's errors, ``HTTPException``),
monailabel's own routes get :func:`monailabel_exception_handler` (registered on the app by ``lib.server``)."""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Callable, Optional

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from monailabel.interfaces.exception import (ImageNotFoundException, LabelNotFoundException, MONAILabelError,
                                             MONAILabelException)

logger = logging.getLogger("ensam.server")


# ---------------------------------------------------------------------------------------------------- errors
# The project's own request-validation errors, by (module, class name): the loader re-creates lib.* classes, so
# class identity cannot be used (see the module docstring). Everything else is a server fault.
_VALIDATION_ERRORS = {("lib.errors", "RequestError"): 400, ("lib.geometry", "PromptError"): 422}


def http_error_for(exc: BaseException) -> Optional[HTTPException]:
    """The 4xx answer for a request error, or None for a server fault (-> 500 with the traceback logged).

    4xx only for: HTTPException; ensam's RequestError (its ``status_code``) and PromptError (422); monailabel's
    own "not found" (404) and INVALID_INPUT (400; 404 for "no model") errors. A ValueError, FileNotFoundError,
    ... raised anywhere else is not the client's error."""
    if isinstance(exc, HTTPException):
        return exc
    for cls in type(exc).__mro__:
        default = _VALIDATION_ERRORS.get((cls.__module__, cls.__name__))
        if default is not None:
            code = getattr(exc, "status_code", default)
            return HTTPException(status_code=code if isinstance(code, int) and 400 <= code < 500 else default,
                                 detail=str(exc))
    if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)):
        return HTTPException(status_code=404, detail=str(exc.msg))
    if isinstance(exc, MONAILabelException) and exc.error == MONAILabelError.INVALID_INPUT:
        code = 404 if "no model" in str(exc.msg).lower() else 400
        return HTTPException(status_code=code, detail=exc.msg)
    return None


def as_http_error(exc: BaseException, what: str) -> HTTPException:
    """``exc`` as its answer: its 4xx (one log line), or a 500 naming ``what`` (logged with the traceback)."""
    err = http_error_for(exc)
    if err is None:
        logger.error(f"{what} failed", exc_info=exc)
        return HTTPException(status_code=500, detail=f"{what} failed: {type(exc).__name__}: {exc}")
    if err.status_code < 500:
        logger.warning(f"rejected request ({err.status_code}): {what}: {err.detail}")
    return err


def answers(what: str) -> Callable[[Callable], Callable]:
    """Decorator of a route handler: whatever the handler raises becomes its answer through :func:`as_http_error`
    (the one mapping), so the handler just raises. ``what`` names the request in the log and in a 500's detail; it is
    formatted with the handler's arguments (``"scoring ({method})"``). The decorated handler keeps the handler's
    signature (FastAPI reads its parameters) and kind (``async def`` or ``def``: FastAPI runs the latter in its
    thread pool)."""
    def decorate(handler: Callable) -> Callable:
        signature = inspect.signature(handler, eval_str=True)  # annotations resolved in the handler's module

        def reraise(e: Exception, args: tuple, kwargs: dict):
            try:
                described = what.format(**signature.bind_partial(*args, **kwargs).arguments)
            except (KeyError, IndexError, TypeError, ValueError):
                described = what
            err = as_http_error(e, described)
            if err is e:  # an HTTPException: as raised
                raise e
            raise err from (e if err.status_code >= 500 else None)

        if inspect.iscoroutinefunction(handler):
            @functools.wraps(handler)
            async def route(*args, **kwargs):
                try:
                    return await handler(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - every error becomes an HTTP answer
                    reraise(e, args, kwargs)
        else:
            @functools.wraps(handler)
            def route(*args, **kwargs):
                try:
                    return handler(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - every error becomes an HTTP answer
                    reraise(e, args, kwargs)
        route.__signature__ = signature
        return route

    return decorate


async def monailabel_exception_handler(request: Request, exc: MONAILabelException):
    """monailabel's own routes (datastore, sessions, ...) raise MONAILabelException for an unknown id: 404, not 500."""
    err = http_error_for(exc)
    if err is None:
        logger.error(f"{request.method} {request.url.path} failed: {exc.error}: {exc.msg}", exc_info=exc)
        return JSONResponse(status_code=500, content={"detail": f"{exc.error.value}: {exc.msg}"})
    logger.warning(f"rejected request ({err.status_code}): {request.method} {request.url.path}: {err.detail}")
    return JSONResponse(status_code=err.status_code, content={"detail": err.detail})
