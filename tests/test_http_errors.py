"""ensam's routes just raise: one decorator (``lib.http.errors.answers``) maps what they raise to the answer through
the one mapping ``http_error_for`` (4xx for the client's errors, 500 with the traceback logged otherwise); and no
module of ``lib.http`` reaches into monailabel's private names (they are behind ``lib.monailabel_patches``)."""

from __future__ import annotations

import glob
import inspect
import logging
import os
import re
import threading

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient

from lib.errors import RequestError
from lib.geometry import PromptError
from lib.http.errors import answers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HTTP = os.path.join(ROOT, "apps", "ensam", "lib", "http")


def _failing(n: int):
    if n == 1:
        raise RequestError("too many clicks", status_code=413)
    if n == 2:
        raise PromptError("click [99, 0, 0] outside the image")
    if n == 3:
        raise RuntimeError("boom")
    if n == 4:
        raise HTTPException(status_code=409, detail="nothing to undo")
    if n == 5:
        raise ValueError("a bug, not the client's error")
    return {"n": n, "thread": threading.get_ident()}


@answers("thing {n} for {who!r}")
def sync_route(n: int, who: str = "me"):
    return _failing(n)


@answers("async thing {n}")
async def async_route(n: int):
    return _failing(n)


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    app.get("/sync")(sync_route)
    app.get("/async")(async_route)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("path", ["/sync", "/async"])
def test_what_a_route_raises_is_its_answer(client, path, caplog):
    r = client.get(path, params={"n": 1})
    assert (r.status_code, r.json()) == (413, {"detail": "too many clicks"})
    r = client.get(path, params={"n": 2})
    assert (r.status_code, r.json()) == (422, {"detail": "click [99, 0, 0] outside the image"})
    r = client.get(path, params={"n": 4})
    assert (r.status_code, r.json()) == (409, {"detail": "nothing to undo"})
    what = "thing 3 for 'me'" if path == "/sync" else "async thing 3"
    with caplog.at_level(logging.ERROR, logger="ensam.server"):
        r = client.get(path, params={"n": 3})
    assert (r.status_code, r.json()) == (500, {"detail": f"{what} failed: RuntimeError: boom"})
    assert "Traceback" in caplog.text and "RuntimeError: boom" in caplog.text  # the server's fault, logged
    r = client.get(path, params={"n": 5})
    assert r.status_code == 500 and "ValueError" in r.json()["detail"]
    r = client.get(path, params={"n": 0})
    assert r.status_code == 200 and r.json()["n"] == 0
    r = client.get(path, params={"n": "one"})  # FastAPI still reads the handler's own parameters
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "n"]


def test_the_decorated_route_keeps_its_kind_and_signature(client):
    assert inspect.iscoroutinefunction(async_route) and not inspect.iscoroutinefunction(sync_route)
    assert list(inspect.signature(sync_route).parameters) == ["n", "who"]
    # a plain def still runs in FastAPI's thread pool, away from the event loop's thread
    loop_thread = client.get("/async", params={"n": 0}).json()["thread"]
    assert client.get("/sync", params={"n": 0}).json()["thread"] != loop_thread


def test_routes_have_no_copies_of_the_mapping():
    """The try/except -> 4xx block is gone from the routes: they raise, the decorator answers."""
    for path in glob.glob(os.path.join(HTTP, "*.py")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert "_raise_for" not in text, path


def test_lib_http_reads_no_monailabel_private_name():
    """monailabel's private names (the app's task tables, the DICOMweb datastore's local cache) are read in
    ``lib.monailabel_patches`` only (its patch inventory, item 9)."""
    private = re.compile(r"""(\.|["'])_(infers|trainers|strategies|scoring_methods|batch_infer|datastore|client)\b""")
    for path in glob.glob(os.path.join(HTTP, "*.py")):
        with open(path, encoding="utf-8") as f:
            hits = [line for line in f if private.search(line)]
        assert not hits, (path, hits)
    from lib import monailabel_patches

    assert "app_tasks" in monailabel_patches.__doc__ and "dicomweb_series_folder" in monailabel_patches.__doc__
