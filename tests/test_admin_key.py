"""--admin-api-key (issue 16): admin routes take the admin key only; --api-key opens the rest
and no longer the admin routes; /health stays open."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from asgl.config import EngineConfig
from asgl.server.app import build_app
from asgl.server.middleware import ADMIN_PATHS

USER, ADMIN = "sk-user", "sk-admin"


def _client(**keys) -> TestClient:
    engine = SimpleNamespace(tokenizer=None, flush_cache=lambda: True, abort=lambda rid: False,
                             context_len=64, vocab_size=10, stalled=None)
    return TestClient(TestServer(build_app(engine, EngineConfig(**keys))))


async def _status(client: TestClient, method: str, path: str, key) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = b'{"rid": "x"}' if method == "POST" else None
    async with client.request(method, path, data=body, headers=headers) as r:
        await r.read()
        return r.status


@pytest.mark.parametrize("with_user_key", [True, False])
async def test_admin_routes_need_the_admin_key(with_user_key):
    keys = {"admin_api_key": ADMIN, **({"api_key": USER} if with_user_key else {})}
    async with _client(**keys) as client:
        for method, path in [("POST", "/flush_cache"), ("POST", "/abort_request")]:
            assert path in ADMIN_PATHS
            assert await _status(client, method, path, None) == 401
            assert await _status(client, method, path, USER) == 403
            assert await _status(client, method, path, ADMIN) == 200
        # a user route: the user key (if any) and the admin key open it
        assert await _status(client, "GET", "/v1/models", ADMIN) == 200
        expected = 401 if with_user_key else 200
        assert await _status(client, "GET", "/v1/models", None) == expected
        assert await _status(client, "GET", "/v1/models", USER) == 200
        assert await _status(client, "GET", "/health", None) == 200


async def test_without_admin_key_the_api_key_opens_admin_routes():
    async with _client(api_key=USER) as client:
        assert await _status(client, "POST", "/flush_cache", None) == 401
        assert await _status(client, "POST", "/flush_cache", USER) == 200
