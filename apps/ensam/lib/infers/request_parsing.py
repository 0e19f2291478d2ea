"""The request parsing of :mod:`lib.request_parsing`, under its former name for ``seg_by_example``'s relative import
(nothing else imports this name; it goes once that module imports ``lib.request_parsing``)."""

from lib.request_parsing import RequestError, first_value  # noqa: F401

__all__ = ["RequestError", "first_value"]
