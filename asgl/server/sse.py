"""Server-sent events: `data: <json>\\n\\n` per event, `data: [DONE]\\n\\n` at the end.

The response is opened (headers sent) at the first event, not before: a request that
fails before producing anything still gets an ordinary JSON error with its status code.
An error after the first event can only be reported in-band, as a `data: {"error": ...}`
event before `[DONE]`, which is what OpenAI's clients expect.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional

from aiohttp import web

from asgl.server.errors import ApiError, classify, error_body, request_id
from asgl.server.jsonio import encode

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell proxies not to buffer the stream
}


# Bytes a client may leave unread in the connection's send buffer before events wait in
# `pending` (and, for cumulative formats, replace each other) instead of being written.
HIGH_WATER = 1 << 20


class SSEWriter:
    """Events are written synchronously (`emit`), so the engine's step can hand each
    request's chunk straight to its response: the frame goes to the connection's transport
    in one write, with the chunked transfer framing aiohttp chose, and no coroutine runs per
    event. Frames emitted before the response is open (the first one opens it, in a task)
    or while the client is not reading wait in `pending`; with `cumulative=True` each event
    holds the whole output so far, so only the newest one waits."""

    def __init__(self, request: web.Request, cumulative: bool = False):
        self._request = request
        self.cumulative = cumulative
        self.response: Optional[web.StreamResponse] = None
        self._opening: Optional[asyncio.Task] = None
        self._pending: list[bytes] = []
        self._transport: Optional[asyncio.Transport] = None
        self._chunked = False

    @property
    def started(self) -> bool:
        return self._opening is not None or self.response is not None

    async def _open(self) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=_HEADERS)
        await resp.prepare(self._request)
        self.response = resp
        self._transport = self._request.transport
        self._chunked = resp.headers.get("Transfer-Encoding", "").lower() == "chunked"
        if self._pending and not self._transport.is_closing():  # what came while opening
            self._write(b"".join(self._pending))
            self._pending.clear()
        return resp

    def emit(self, event: object) -> None:
        """One event whose data is `event` encoded as JSON."""
        self.emit_raw(b"data: " + encode(event) + b"\n\n")

    def emit_raw(self, frame: bytes) -> None:
        if self.response is None:
            if self._opening is None:
                self._opening = asyncio.ensure_future(self._open())
            self._hold(frame)
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if transport.get_write_buffer_size() > HIGH_WATER:
            self._hold(frame)  # the client is behind: written when it catches up
            return
        if self._pending:
            frame = b"".join([*self._pending, frame])
            self._pending.clear()
        self._write(frame)

    def _write(self, data: bytes) -> None:
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._transport.write(data)

    def _hold(self, frame: bytes) -> None:
        if self.cumulative:
            self._pending[:] = [frame]
        else:
            self._pending.append(frame)

    async def send(self, event: object) -> None:
        """`emit`, for callers outside an engine step (errors, usage, [DONE])."""
        await self.send_raw(b"data: " + encode(event) + b"\n\n")

    async def send_raw(self, frame: bytes) -> None:
        resp = await self._ready()
        if self._pending:
            frame = b"".join([*self._pending, frame])
            self._pending.clear()
        await resp.write(frame)

    async def _ready(self) -> web.StreamResponse:
        if self.response is None:
            if self._opening is None:
                self._opening = asyncio.ensure_future(self._open())
            await self._opening
        return self.response

    def cancel(self) -> None:
        """Nothing more will be sent: stop opening the response."""
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()

    async def send_error(self, status: int, message: str, param: Optional[str] = None) -> None:
        await self.send(error_body(status, message, param))

    async def finish(self) -> web.StreamResponse:
        """Send what is pending, [DONE], and end the response."""
        await self.send_raw(DONE)
        await self.response.write_eof()
        return self.response


async def stream_events(request: web.Request,
                        produce: Callable[[SSEWriter], Awaitable[None]],
                        cumulative: bool = False) -> web.StreamResponse:
    """Run `produce`, which emits events; then [DONE]. An expected error before the first
    event propagates (a plain error response); after it, it is sent in-band."""
    sse = SSEWriter(request, cumulative)
    try:
        await produce(sse)
    except (ConnectionResetError, asyncio.CancelledError):
        sse.cancel()
        raise  # the client is gone (its request was aborted on the way out): nothing to say
    except Exception as e:
        if not sse.started:
            raise
        err = classify(e)
        if err is None:  # a bug: the status line is gone, so report it in-band
            rid = request_id(request)
            logger.exception("stream failed after it started (request id %s)", rid)
            err = ApiError(500, f"internal error: {type(e).__name__} (request id {rid})")
        await sse.send_error(err.status, err.message, err.param)
    return await sse.finish()
