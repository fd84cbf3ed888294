"""A server with --api-key and a short queue: the key is required on every route but
/health (each route tested, unknown ones too); a full queue answers 503 with Retry-After;
SIGTERM lets in-flight requests finish, then the process exits cleanly."""

from __future__ import annotations

import asyncio
import json
import signal
from types import SimpleNamespace

import aiohttp
import pytest

from asgl.config import EngineConfig
from asgl.server.app import build_app
from server_fixture import API_KEY, ServerProcess, guarded_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)


def all_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the app registers, read from the router itself so a
    new route cannot skip this test; plus paths that match no route."""
    app = build_app(SimpleNamespace(tokenizer=None), EngineConfig())
    routes = {(r.method, r.resource.canonical.replace("{model}", "default"))
              for r in app.router.routes()}
    routes |= {("GET", "/no/such/route"), ("POST", "/v1/embeddings"), ("DELETE", "/generate")}
    return sorted(routes)


async def _call(server: ServerProcess, method: str, path: str, headers: dict) -> int:
    body = b"{}" if method == "POST" else None
    async with aiohttp.ClientSession() as s:
        async with s.request(method, server.url + path, data=body, headers=headers) as r:
            await r.read()
            return r.status


@pytest.mark.parametrize("method, path", all_routes())
async def test_api_key_on_every_route(guarded_server, method, path):
    if path == "/health":
        assert await _call(guarded_server, method, path, {}) == 200
        return
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}, {"X-Api-Key": API_KEY}):
        assert await _call(guarded_server, method, path, headers) == 401, headers
    ok = await _call(guarded_server, method, path, {"Authorization": f"Bearer {API_KEY}"})
    assert ok != 401 and ok < 500


async def test_unauthorized_body(guarded_server):
    async with aiohttp.ClientSession() as s:
        async with s.post(guarded_server.url + "/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 401
            err = (await r.json())["error"]
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"


async def test_queue_limit(guarded_server):
    """2 running + 4 queued at most: a burst of 10 gets some 503s, each with Retry-After;
    every accepted request completes."""
    headers = guarded_server.headers
    body = {"text": "Tell me a story.", "sampling_params": {"max_new_tokens": 4,
                                                            "ignore_eos": True}}

    async def one(s: aiohttp.ClientSession) -> tuple[int, dict, dict]:
        async with s.post(guarded_server.url + "/generate", json=body) as r:
            return r.status, await r.json(), dict(r.headers)

    async with aiohttp.ClientSession(headers=headers) as s:
        answers = await asyncio.gather(*(one(s) for _ in range(10)))
        busy = [a for a in answers if a[0] == 503]
        done = [a for a in answers if a[0] == 200]
        assert busy and done and len(busy) + len(done) == 10, [a[0] for a in answers]
        for _, err, hdrs in busy:
            assert hdrs["Retry-After"] == "1" and err["error"]["code"] == "queue_full"
        assert all(d["meta_info"]["completion_tokens"] == 4 for _, d, _ in done)
        status, _, _ = await one(s)  # the queue drained: accepted again
        assert status == 200
        async with s.get(guarded_server.url + "/metrics") as r:
            assert 'asgl:rejected_requests_total{reason="queue_full"}' in await r.text()
    guarded_server.assert_no_leak()


async def test_sigterm_finishes_in_flight_requests(guarded_server):
    """Runs last in this module: it stops the server."""
    body = {"text": "Count to fifty:", "stream": True,
            "sampling_params": {"max_new_tokens": 12, "ignore_eos": True}}
    async with aiohttp.ClientSession(headers=guarded_server.headers) as s:
        async with s.post(guarded_server.url + "/generate", json=body) as r:
            first = await r.content.readline()
            assert first.startswith(b"data: ")
            guarded_server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            with pytest.raises(aiohttp.ClientConnectionError):  # no longer listening
                async with aiohttp.ClientSession() as fresh:
                    await fresh.get(guarded_server.url + "/health")
            rest = await r.read()
    frames = (first + rest).split(b"\n\n")
    assert frames[-2:] == [b"data: [DONE]", b""]
    last = json.loads(frames[-3][6:])
    assert last["meta_info"]["completion_tokens"] == 12
    assert last["meta_info"]["finish_reason"]["type"] == "length"
    loop = asyncio.get_running_loop()
    code = await loop.run_in_executor(None, guarded_server.proc.wait, 30)
    assert code == 0, guarded_server.log()[-3000:]
