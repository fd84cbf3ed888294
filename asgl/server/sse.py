"""Server-sent events: `data: <json>\\n\\n` per event, `data: [DONE]\\n\\n` at the end.

The response is opened (headers sent) at the first event, not before: a request that
fails before producing anything still gets an ordinary JSON error with its status code.
An error after the first event can only be reported in-band, as a `data: {"error": ...}`
event before `[DONE]`, which is what OpenAI's clients expect.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Optional

from aiohttp import web

from asgl.server.errors import ApiError, classify, error_body
from asgl.server.jsonio import encode

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell proxies not to buffer the stream
}


class SSEWriter:
    def __init__(self, request: web.Request):
        self._request = request
        self.response: Optional[web.StreamResponse] = None

    @property
    def started(self) -> bool:
        return self.response is not None

    async def _open(self) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=_HEADERS)
        await resp.prepare(self._request)
        self.response = resp
        return resp

    async def send(self, event: object) -> None:
        """One event whose data is `event` encoded as JSON."""
        await self.send_raw(b"data: " + encode(event) + b"\n\n")

    async def send_raw(self, frame: bytes) -> None:
        resp = self.response or await self._open()
        await resp.write(frame)

    async def send_error(self, status: int, message: str, param: Optional[str] = None) -> None:
        await self.send(error_body(status, message, param))

    async def finish(self) -> web.StreamResponse:
        """Send [DONE] and end the response."""
        await self.send_raw(DONE)
        await self.response.write_eof()
        return self.response


async def stream_events(request: web.Request,
                        produce: Callable[[SSEWriter], Awaitable[None]]) -> web.StreamResponse:
    """Run `produce`, which sends events; then [DONE]. An expected error before the first
    event propagates (a plain error response); after it, it is sent in-band."""
    sse = SSEWriter(request)
    try:
        await produce(sse)
    except ConnectionResetError:
        raise  # the client is gone (its request was aborted on the way out): nothing to say
    except Exception as e:
        if not sse.started:
            raise
        err = classify(e)
        if err is None:  # a bug: the status line is gone, so report it in-band
            logger.exception("stream failed after it started")
            err = ApiError(500, f"internal error: {type(e).__name__}")
        await sse.send_error(err.status, err.message, err.param)
    return await sse.finish()
