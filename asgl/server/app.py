"""The aiohttp application: routes, middlewares and shared state, around a started engine.

`build_app(engine, config)` works with any object that has the Engine API, so tests can
serve a fake engine in-process; `launch.run_server` builds the real one.
"""

from __future__ import annotations

from typing import Any, Optional

from aiohttp import web

from asgl.config import EngineConfig
from asgl.server import (batch_api, embeddings, lang_routes, native, rerank, responses_api,
                         tokenize_routes)
from asgl.server.metrics import CONTENT_TYPE, Metrics
from asgl.server.middleware import auth_middleware, error_middleware, metrics_middleware
from asgl.server.openai_chat import chat_completions
from asgl.server.openai_common import list_models, retrieve_model
from asgl.server.openai_completions import completions
from asgl.server.jsonio import json_response
from asgl.server.openapi import openapi_json
from asgl.server.protocol import ModelCard
from asgl.server.state import STATE, ServerState, get_state
from asgl.server.tokens import TokenTexts
from asgl.server.reasoning_parsers import check_name as check_reasoning_parser
from asgl.server.tool_calls import get_format


def served_model_name(config: EngineConfig, engine: Any) -> str:
    source = getattr(engine, "source", None)
    return (config.served_model_name or getattr(source, "name", None) or config.model_path
            or "default")


# Names that every server answers to besides its served name: SGLang's README sends
# model="default", and every route accepts any name; /v1/models/{id} must agree.
MODEL_ALIASES = ("default",)


async def retrieve_model_or_alias(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: the served model's card for its id, an alias or its path; any
    other id is openai_common's 404."""
    state = get_state(request)
    name = request.match_info["model"]
    if name != state.model_name and (name in MODEL_ALIASES or name == state.config.model_path):
        return await list_models_card(state)
    return await retrieve_model(request)


async def list_models_card(state: ServerState) -> web.Response:
    card = ModelCard(id=state.model_name, created=int(state.started_at),
                     root=state.config.model_path or state.model_name,
                     max_model_len=state.context_len)
    return json_response(card)


def with_model_path(config: EngineConfig, engine: Any) -> EngineConfig:
    """The config the server reports: --model-path filled in with what was loaded (the
    embedded default's file when none was given), so /get_server_info names it."""
    source = getattr(engine, "source", None)
    path = config.model_path or getattr(source, "model_path", None)
    return config.replace(model_path=path) if path and path != config.model_path else config


async def metrics_handler(request: web.Request) -> web.Response:
    body = get_state(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def build_app(engine: Any, config: EngineConfig, model_name: Optional[str] = None) -> web.Application:
    get_format(config.tool_call_parser)  # an unknown --tool-call-parser fails at start
    check_reasoning_parser(config.reasoning_parser)  # so does an unknown --reasoning-parser
    model_name = model_name or served_model_name(config, engine)
    metrics = Metrics(lambda: engine, config.metrics_prefix, model_name)
    config = with_model_path(config, engine)
    state = ServerState(engine=engine, config=config, metrics=metrics,
                        model_name=model_name,
                        token_texts=TokenTexts(engine.tokenizer))
    middlewares = [metrics_middleware, error_middleware]
    auth = auth_middleware(config.api_key, config.admin_api_key)
    if auth is not None:
        middlewares.append(auth)
    app = web.Application(middlewares=middlewares, client_max_size=state.max_body_bytes)
    app[STATE] = state
    native.add_routes(app)
    lang_routes.add_routes(app)  # the frontend's /concate_and_append_request
    embeddings.add_routes(app)  # /v1/embeddings, /encode
    batch_api.add_routes(app, config)  # /v1/files, /v1/batches
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/", list_models)  # clients that join base_url + "/"
    app.router.add_get("/v1/models/{model}", retrieve_model_or_alias)
    tokenize_routes.add_routes(app)  # /tokenize, /detokenize (+ /v1/)
    responses_api.add_routes(app)  # /v1/responses
    rerank.add_routes(app)  # /v1/rerank, /v1/score (cross-encoders)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi_json)
    return app
