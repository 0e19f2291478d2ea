"""The project's request-validation error, below every module that raises it (I/O, request parsing, infer tasks) and
free of MONAI Label, so that code which runs without a server (``lib.io``, the engine) can raise it too."""

from __future__ import annotations

__all__ = ["RequestError"]


class RequestError(ValueError):
    """A bad request: the server answers ``status_code`` with ``str(self)`` as the detail; nothing is changed."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.status_code = int(status_code)
