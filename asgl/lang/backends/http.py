"""JSON-over-HTTP plumbing for the HTTP backends: one aiohttp session per event loop, errors
as `BackendError` with the server's own message, and server-sent events."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional

from asgl.lang import event_loop
from asgl.lang.backends.base import BackendError

if TYPE_CHECKING:
    import aiohttp

# run_batch pushes every program at once: don't let the client's pool be the bottleneck.
_MAX_CONNECTIONS = 1024


class HttpClient:
    def __init__(self, base_url: str, headers: Optional[dict[str, str]] = None,
                 timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self.timeout = timeout
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}

    def session(self) -> aiohttp.ClientSession:
        # A session belongs to the loop it was made on; backends run on the interpreter's
        # loop, so in practice there is one.
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            import aiohttp  # on first use: its import (SSL contexts) costs `import asgl.lang`

            session = aiohttp.ClientSession(
                headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=_MAX_CONNECTIONS))
            self._sessions[loop] = session
            event_loop.close_at_exit(self)
        return session

    async def get_json(self, path: str) -> Any:
        async with self.session().get(self.base_url + path) as resp:
            return await self._json(resp, path)

    async def post_json(self, path: str, body: dict) -> Any:
        async with self.session().post(self.base_url + path, json=body) as resp:
            return await self._json(resp, path)

    async def post_sse(self, path: str, body: dict) -> AsyncIterator[tuple[str, Any]]:
        """(event name, decoded data) per server-sent event, until `[DONE]` or the end."""
        async with self.session().post(self.base_url + path, json=body) as resp:
            if resp.status != 200:
                raise self._error(resp.status, await resp.read(), path)
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk.replace(b"\r\n", b"\n")
                while b"\n\n" in buffer:
                    frame, buffer = buffer.split(b"\n\n", 1)
                    event = _parse_frame(frame)
                    if event is None:
                        continue
                    if event[1] == "[DONE]":
                        return
                    data = _decode(event[1], path)
                    if isinstance(data, dict) and "error" in data:  # reported in-band
                        raise self._error(500, event[1].encode(), path)
                    yield event[0], data

    async def _json(self, resp: aiohttp.ClientResponse, path: str) -> Any:
        body = await resp.read()
        if resp.status != 200:
            raise self._error(resp.status, body, path)
        return _decode(body, path)

    def _error(self, status: int, body: bytes, path: str) -> BackendError:
        message, param = body.decode("utf-8", "replace")[:2000], None
        try:
            err = json.loads(body).get("error")
            if isinstance(err, dict):
                message, param = err.get("message", message), err.get("param")
            elif isinstance(err, str):
                message = err
        except (ValueError, AttributeError):
            pass
        return BackendError(f"{self.base_url}{path} answered HTTP {status}: {message}",
                            status=status, param=param)

    async def aclose(self) -> None:
        for loop, session in list(self._sessions.items()):
            if loop is asyncio.get_running_loop():
                await session.close()
                del self._sessions[loop]


def _parse_frame(frame: bytes) -> Optional[tuple[str, str]]:
    name, data = "message", []
    for line in frame.decode("utf-8").split("\n"):
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    return (name, "\n".join(data)) if data else None


def _decode(body: Any, path: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise BackendError(f"{path}: the server answered with something that is not JSON: "
                           f"{str(body)[:200]}") from None
