"""Embeddings over HTTP: OpenAI's POST /v1/embeddings and SGLang's native POST /encode.

/v1/embeddings takes `input` as a string, a list of strings, a list of token ids or a list
of such lists; `encoding_format` "float" (default) or "base64" (little-endian float32, what
the openai SDK asks for by default and decodes itself); `dimensions` only for Matryoshka
models (or the full size), otherwise 400. Extension: `truncate` (bool, default false; the
name TEI uses): inputs longer than the context length are cut to it instead of refused.

/encode takes SGLang's `text` (string or list) or `input_ids` (ids or list of id lists)
and answers `{"embedding", "meta_info"}`, or a list of them for a batch.

Validation lives in the engine (`Engine.embed` raises InvalidRequest, a 400 naming the
field); a request is all or nothing.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Literal, Optional, Union

import msgspec
import numpy as np
from aiohttp import web

from asgl.engine.contracts.errors import InvalidRequest
from asgl.server import limits
from asgl.server.errors import ApiError, bad_request
from asgl.server.jsonio import json_response, read_json
from asgl.server.openai_common import response_model
from asgl.server.state import ServerState, get_state

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
_REQ = dict(forbid_unknown_fields=True, kw_only=True)


class EmbeddingRequest(msgspec.Struct, **_REQ):
    # str, list[str], list[int] or list[list[int]] (checked by the engine)
    input: Union[str, list[Any]]
    model: Optional[str] = None
    encoding_format: Optional[Literal["float", "base64"]] = None
    dimensions: Optional[int] = None
    user: Optional[str] = None
    truncate: Optional[bool] = None  # extension: cut long inputs instead of a 400


class EncodeRequest(msgspec.Struct, **_REQ):
    text: Union[str, list[str], None] = None
    input_ids: Optional[list[Any]] = None
    rid: Union[str, list[str], None] = None
    truncate: bool = False
    dimensions: Optional[int] = None


class Embedding(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    embedding: Union[list[float], str]
    index: int


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class EncodeMetaInfo(msgspec.Struct):
    id: str
    prompt_tokens: int
    e2e_latency: float


class EncodeResponse(msgspec.Struct):
    embedding: list[float]
    meta_info: EncodeMetaInfo


# --------------------------------------------------------------------------- handlers
async def create_embeddings(request: web.Request) -> web.Response:
    state = get_state(request)
    body = await read_json(request, EmbeddingRequest)
    inputs = body.input
    if isinstance(inputs, list) and inputs and all(type(t) is int for t in inputs):
        inputs = [inputs]  # one token-id input: keep the engine's list-in, list-out shape
    elif isinstance(inputs, str):
        inputs = [inputs]
    outs = await _embed(state, inputs, bool(body.truncate), body.dimensions)
    as_base64 = body.encoding_format == "base64"
    data = [Embedding(embedding=_b64(o.embedding) if as_base64 else o.embedding, index=o.index)
            for o in outs]
    tokens = sum(o.prompt_tokens for o in outs)
    return json_response(EmbeddingResponse(data=data, model=response_model(state, body.model),
                                           usage=EmbeddingUsage(tokens, tokens)))


async def encode(request: web.Request) -> web.Response:
    arrival = time.monotonic()
    state = get_state(request)
    body = await read_json(request, EncodeRequest)
    if (body.text is None) == (body.input_ids is None):
        raise bad_request("give either text or input_ids", "text")
    raw = body.text if body.text is not None else body.input_ids
    single = isinstance(raw, str) or (bool(raw) and all(type(t) is int for t in raw))
    outs = await _embed(state, [raw] if single else raw, body.truncate, body.dimensions,
                        "text" if body.text is not None else "input_ids")
    rids = [body.rid] if isinstance(body.rid, str) else body.rid
    if rids is not None and len(rids) != len(outs):
        raise bad_request(f"rid has {len(rids)} entries for {len(outs)} inputs", "rid")
    latency = round(time.monotonic() - arrival, 6)
    results = [EncodeResponse(o.embedding, EncodeMetaInfo(
        id=rids[o.index] if rids else uuid.uuid4().hex, prompt_tokens=o.prompt_tokens,
        e2e_latency=latency)) for o in outs]
    return json_response(results[0] if single else results)


async def _embed(state: ServerState, inputs: Any, truncate: bool, dimensions: Optional[int],
                 param: str = "input") -> list:
    if not state.config.is_embedding:
        raise bad_request("this server runs a generative model; start it with --is-embedding "
                          "to serve embeddings", "model")
    count = len(inputs) if isinstance(inputs, list) else 1
    if count > MAX_INPUTS:
        raise bad_request(f"{param} has {count} items; the limit is {MAX_INPUTS}", param)
    _check_admission(state, count)
    try:
        outs = await state.engine.embed(inputs, truncate=truncate, dimensions=dimensions)
    except InvalidRequest as e:  # name the field of this route ("text" on /encode)
        raise bad_request(str(e), param if e.param == "input" else e.param) from None
    state.metrics.prompt_tokens.inc(sum(o.prompt_tokens for o in outs))
    return outs


def _check_admission(state: ServerState, count: int) -> None:
    """limits.check_admission's rules, against the embedder's queue."""
    if state.draining:
        state.metrics.rejected.labels("draining").inc()
        raise ApiError(503, "the server is shutting down", code="server_shutting_down",
                       headers={"Retry-After": limits.RETRY_AFTER_SECONDS})
    limit = state.config.max_queued_requests
    waiting = getattr(getattr(state.engine, "embedder", None), "num_waiting", 0)
    if limit is not None and waiting + count > limit:
        state.metrics.rejected.labels("queue_full").inc()
        raise ApiError(503, f"the server is busy: {waiting} inputs are waiting "
                       f"(--max-queued-requests {limit}); retry later", code="queue_full",
                       headers={"Retry-After": limits.RETRY_AFTER_SECONDS})


def _b64(vector: list[float]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", create_embeddings)
    app.router.add_post("/encode", encode)
