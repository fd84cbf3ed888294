"""Routes SGLang's frontend (`sglang.RuntimeEndpoint`) calls besides the native API:
`/concate_and_append_request`, for `forks.join(mode="concate_and_append")`.

SGLang's client sends it after appending the branches' text to the parent state; its server
then splices the branches' KV caches onto the parent's request, so the next `/generate`
skips their prefill. asgl keeps no per-request KV to splice: the parent's next `/generate`
carries the joined text, and the radix cache serves whatever prefix of it is cached. So the
route checks the request's shape and acknowledges it; the result is the same text and the
same generation, with the joined part prefilled by that next request.

Registered by `add_routes(app)` (asgl/server/app.py).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def _error(message: str, param: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param}}
    return web.json_response(body, status=400)


async def concate_and_append_request(request: web.Request) -> web.Response:
    try:
        body: Any = await request.json() if request.can_read_body else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error("the body is not JSON", "body")
    if not isinstance(body, dict):
        return _error("the body must be a JSON object", "body")
    src = body.get("src_rids")
    if not isinstance(src, list) or not all(isinstance(r, str) for r in src):
        return _error("src_rids must be a list of request ids (strings)", "src_rids")
    if not isinstance(body.get("dst_rid"), str):
        return _error("dst_rid must be a request id (a string)", "dst_rid")
    return web.json_response({"success": True, "kv_concatenated": False,
                              "message": "asgl joins forks by text: the next /generate "
                                         "reuses the radix cache"})


def add_routes(app: web.Application) -> None:
    # SGLang's client POSTs it with a JSON body; GET is accepted as its other calls are
    app.router.add_post("/concate_and_append_request", concate_and_append_request)
    app.router.add_get("/concate_and_append_request", concate_and_append_request)
