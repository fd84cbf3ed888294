"""GET /openapi.json: an OpenAPI 3.1 description generated from the request structs, so it
cannot drift from what the server really accepts (fuzzers and client generators read it)."""

from __future__ import annotations

from functools import lru_cache

import msgspec
from aiohttp import web

import asgl
from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.server.jsonio import json_response
from asgl.server.embeddings import EmbeddingRequest, EncodeRequest
from asgl.server.protocol import (AbortRequest, ChatCompletionRequest, CompletionRequest,
                                  GenerateRequest)

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
]

_REF = "#/components/schemas/{name}"
_ERROR = {"description": "an OpenAI-style error body: {\"error\": {message, type, param, code}}"}


@lru_cache(maxsize=1)
def openapi_document() -> dict:
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
    return {"openapi": "3.1.0",
            "info": {"title": "asgl", "version": asgl.__version__},
            "paths": paths, "components": {"schemas": components}}


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(openapi_document())
