"""Reading request bodies into protocol structs and writing JSON responses."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from asgl.server.errors import ApiError
from asgl.server.limits import max_tokens_hint
from asgl.server.state import get_state

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder] = {}
_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]*)`")
_MAX_TOKENS_FIELDS = frozenset({"max_tokens", "max_completion_tokens"})


async def read_json(request: web.Request, typ: type[T]) -> T:
    """The body decoded into `typ`; 413 when too large, 400 naming the field otherwise."""
    limit = get_state(request).max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        # refuse before reading a byte of it
        raise ApiError(413, f"the request body has {request.content_length} bytes; the limit "
                       f"is {limit} (--max-request-body-mb)")
    body = await request.read()  # raises 413 itself for a chunked body over the limit
    if not body:
        raise ApiError(400, "the request body is empty: send a JSON object")
    decoder = _decoders.get(typ)
    if decoder is None:
        decoder = _decoders[typ] = msgspec.json.Decoder(typ)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        param = _param_of(str(e))
        hint = ""
        if param in _MAX_TOKENS_FIELDS:  # e.g. 1e23: say what would be accepted
            hint = max_tokens_hint(get_state(request), param)
        raise ApiError(400, f"invalid request: {e}{hint}", param) from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # msgspec's guard against deeply nested input
        raise ApiError(400, "the request body is nested too deeply") from None


def _param_of(message: str) -> str | None:
    """The field a msgspec error is about, as a dotted path ("messages[0].role")."""
    m = _PATH.search(message)
    path = m.group(1).replace("[...]", "") if m else ""  # "[...]": a value of a map
    field = _FIELD.search(message)
    if field:  # unknown or missing field: name it within its object
        path = f"{path}.{field.group(1)}" if path else field.group(1)
    return path or None


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(obj), status=status,
                        content_type="application/json")
