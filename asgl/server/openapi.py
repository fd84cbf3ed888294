"""GET /openapi.json: an OpenAPI 3.1 description generated from the request structs, so it
cannot drift from what the server really accepts (fuzzers and client generators read it)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple, Optional

import msgspec
from aiohttp import web

import asgl
from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.server.jsonio import json_response
from asgl.server.embeddings import EmbeddingRequest, EncodeRequest
from asgl.server.protocol import (AbortRequest, ChatCompletionRequest, CompletionRequest,
                                  GenerateRequest)
from asgl.server.rerank import RerankRequest, ScoreRequest
from asgl.server.responses_api import ResponsesRequest
from asgl.server.state import ServerState, get_state
from asgl.server.tokenize_routes import DetokenizeRequest, TokenizeRequest

# (method, path, request struct or None, summary)
ROUTES = [
    ("post", "/generate", GenerateRequest, "SGLang native generation (single or batch)"),
    ("post", "/v1/completions", CompletionRequest, "OpenAI text completions"),
    ("post", "/v1/chat/completions", ChatCompletionRequest, "OpenAI chat completions"),
    ("post", "/v1/embeddings", EmbeddingRequest, "OpenAI embeddings (--is-embedding)"),
    ("post", "/encode", EncodeRequest, "SGLang native embeddings (--is-embedding)"),
    ("post", "/abort_request", AbortRequest, "abort a request by rid"),
    ("post", "/flush_cache", None, "drop the prefix cache"),
    ("get", "/v1/models", None, "the served model"),
    ("get", "/health", None, "liveness (no API key needed)"),
    ("get", "/health_generate", None, "generates one token"),
    ("get", "/get_model_info", None, "model facts"),
    ("get", "/get_server_info", None, "configuration and live engine state"),
    ("get", "/metrics", None, "Prometheus metrics"),
    # SGLang / vLLM compatibility (docs/compatibility.md)
    ("post", "/tokenize", TokenizeRequest, "text or chat messages to token ids"),
    ("post", "/detokenize", DetokenizeRequest, "token ids to text"),
    ("post", "/v1/responses", ResponsesRequest, "OpenAI Responses API"),
    ("post", "/v1/rerank", RerankRequest, "rerank documents (cross-encoders, --is-embedding)"),
    ("post", "/v1/score", ScoreRequest, "score text pairs (cross-encoders, --is-embedding)"),
    ("get", "/server_info", None, "SGLang's name for /get_server_info"),
    # the Files and Batch APIs (docs/batch.md): OpenAI's shapes, multipart upload
    ("post", "/v1/files", None, "upload a file (multipart: file, purpose)"),
    ("get", "/v1/files", None, "list files"),
    ("get", "/v1/files/{file_id}", None, "a file's object"),
    ("delete", "/v1/files/{file_id}", None, "delete a file"),
    ("get", "/v1/files/{file_id}/content", None, "a file's bytes"),
    ("post", "/v1/batches", None, "create a batch (input_file_id, endpoint, "
                                  "completion_window)"),
    ("get", "/v1/batches", None, "list batches"),
    ("get", "/v1/batches/{batch_id}", None, "a batch's status and counts"),
    ("post", "/v1/batches/{batch_id}/cancel", None, "cancel a batch"),
]

_REF = "#/components/schemas/{name}"
_ERROR = {"description": "an OpenAI-style error body: {\"error\": {message, type, param, code}}"}


class DocLimits(NamedTuple):
    """The server's limits that /openapi.json shows (they depend on flags and the model)."""
    context_len: int
    max_prompt_chars: int
    max_stop_strings: int
    max_stop_string_chars: int
    max_tools: int

    @classmethod
    def of(cls, state: ServerState) -> "DocLimits":
        cfg = state.config
        return cls(state.context_len, state.max_prompt_chars, cfg.max_stop_strings,
                   cfg.max_stop_string_chars, cfg.max_tools)


def _bound(prop: dict, kind: str, **constraints: Any) -> None:
    """Add `constraints` to the `kind` ("integer", "array", ...) branch of a property schema."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == kind:
            branch.update(constraints)


def _stop_bounds(prop: dict, limits: DocLimits) -> None:
    _bound(prop, "string", maxLength=limits.max_stop_string_chars)
    _bound(prop, "array", maxItems=limits.max_stop_strings)
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "array":
            branch["items"] = {"type": "string", "maxLength": limits.max_stop_string_chars}


# SamplingParams fields (decoded from free-form objects, so no Meta constraints: their
# errors name the field through SamplingParams.validate) with the ranges of their OpenAI twins
_SAMPLING_TWINS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                   "frequency_penalty": "frequency_penalty",
                   "presence_penalty": "presence_penalty", "n": "n",
                   "min_new_tokens": "min_tokens", "max_new_tokens": "max_tokens",
                   "logit_bias": "logit_bias"}


def _with_limits(doc: dict, limits: DocLimits) -> None:
    comps = doc["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = comps[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                _bound(props[field], "integer", maximum=limits.context_len)
        _stop_bounds(props["stop"], limits)
    chat = comps["ChatCompletionRequest"]["properties"]
    _bound(chat["tools"], "array", maxItems=limits.max_tools)
    _bound(comps["CompletionRequest"]["properties"]["prompt"], "string",
           maxLength=limits.max_prompt_chars)
    text = comps["GenerateRequest"]["properties"]["text"]
    _bound(text, "string", maxLength=limits.max_prompt_chars)
    _bound(text, "array", items={"type": "string", "maxLength": limits.max_prompt_chars})
    sp = comps["SamplingParams"]["properties"]
    for field, twin in _SAMPLING_TWINS.items():
        for branch in chat[twin].get("anyOf", [chat[twin]]):
            if branch.get("type") not in (None, "null"):
                _bound(sp[field], branch["type"], **{
                    k: v for k, v in branch.items() if k not in ("type", "title")})
    _stop_bounds(sp["stop"], limits)


@lru_cache(maxsize=4)
def openapi_document(limits: Optional[DocLimits] = None) -> dict:
    """The document; with `limits`, the server's configured limits shown in its schemas."""
    structs = [s for _, _, s, _ in ROUTES if s is not None]
    (refs, components) = msgspec.json.schema_components(
        structs + [SamplingParams], ref_template=_REF)
    ref_of = dict(zip(structs, refs))
    # /generate takes sampling_params as free-form objects (unknown keys get a 400 naming
    # them); describe them by the SamplingParams struct they are decoded into.
    components["SamplingParams"]["additionalProperties"] = False
    sp = {"$ref": _REF.format(name="SamplingParams")}
    components["GenerateRequest"]["properties"]["sampling_params"] = {
        "anyOf": [sp, {"type": "array", "items": sp}, {"type": "null"}], "default": None}
    paths: dict = {}
    for method, path, struct, summary in ROUTES:
        op: dict = {"summary": summary,
                    "responses": {"200": {"description": "success"}, "400": _ERROR,
                                  "401": _ERROR, "413": _ERROR, "503": _ERROR}}
        if struct is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": ref_of[struct]}}}
        paths.setdefault(path, {})[method] = op
    doc = {"openapi": "3.1.0",
           "info": {"title": "asgl", "version": asgl.__version__},
           "paths": paths, "components": {"schemas": components}}
    if limits is not None:
        _with_limits(doc, limits)
    return doc


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(openapi_document(DocLimits.of(get_state(request))))
