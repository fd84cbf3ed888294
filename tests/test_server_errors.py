"""The process never dies from a request (issue 16): a bug is a 500 with a request id in the
OpenAI-style body and the traceback in the log; RecursionError and MemoryError end at the
request's boundary; the next request is served as before."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from asgl.server.middleware import error_middleware


def _recurse(n: int) -> int:
    return _recurse(n + 1) + 1


async def _bug(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    if kind == "recursion":
        _recurse(0)
    if kind == "memory":
        raise MemoryError()
    if kind == "key":
        return web.json_response({}[kind])
    return web.json_response({"ok": True})


def _client() -> TestClient:
    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/bug/{kind}", _bug)
    return TestClient(TestServer(app))  # an ephemeral port


@pytest.mark.parametrize("kind, name", [("recursion", "RecursionError"),
                                        ("memory", "MemoryError"), ("key", "KeyError")])
async def test_bug_is_500_with_request_id_and_logged(caplog, kind, name):
    async with _client() as client:
        await _check_bug(client, caplog, kind, name)


async def _check_bug(client: TestClient, caplog, kind: str, name: str) -> None:
    with caplog.at_level(logging.ERROR, logger="asgl.server.errors"):
        r = await client.get(f"/bug/{kind}")
        body = await r.json()
    assert r.status == 500
    rid = r.headers["X-Request-Id"]
    assert body["error"]["type"] == "internal_server_error"
    assert body["error"]["code"] == "internal_error"
    assert name in body["error"]["message"] and rid in body["error"]["message"]
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert logged and logged[0].exc_info and logged[0].exc_info[0].__name__ == name
    ok = await client.get("/bug/none")  # the server keeps serving
    assert ok.status == 200 and (await ok.json()) == {"ok": True}


async def test_client_request_id_is_echoed_only_when_plain():
    async with _client() as client:
        r = await client.get("/bug/key", headers={"X-Request-Id": "trace-42"})
        assert r.headers["X-Request-Id"] == "trace-42"
        r = await client.get("/bug/key", headers={"X-Request-Id": "bad id\twith junk"})
        assert r.headers["X-Request-Id"] != "bad id\twith junk"
        assert len(r.headers["X-Request-Id"]) == 32
