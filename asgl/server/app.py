"""The aiohttp application: routes, middlewares and shared state, around a started engine.

`build_app(engine, config)` works with any object that has the Engine API, so tests can
serve a fake engine in-process; `launch.run_server` builds the real one.
"""

from __future__ import annotations

from typing import Any, Optional

from aiohttp import web

from asgl.config import EngineConfig
from asgl.server import embeddings, native
from asgl.server.metrics import CONTENT_TYPE, Metrics
from asgl.server.middleware import auth_middleware, error_middleware, metrics_middleware
from asgl.server.openai_chat import chat_completions
from asgl.server.openai_common import list_models, retrieve_model
from asgl.server.openai_completions import completions
from asgl.server.openapi import openapi_json
from asgl.server.state import STATE, ServerState, get_state
from asgl.server.tokens import TokenTexts
from asgl.server.tool_calls import get_format


def served_model_name(config: EngineConfig, engine: Any) -> str:
    source = getattr(engine, "source", None)
    return (config.served_model_name or getattr(source, "name", None) or config.model_path
            or "default")


async def metrics_handler(request: web.Request) -> web.Response:
    body = get_state(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def build_app(engine: Any, config: EngineConfig, model_name: Optional[str] = None) -> web.Application:
    get_format(config.tool_call_parser)  # an unknown --tool-call-parser fails at start
    metrics = Metrics(lambda: engine)
    state = ServerState(engine=engine, config=config, metrics=metrics,
                        model_name=model_name or served_model_name(config, engine),
                        token_texts=TokenTexts(engine.tokenizer))
    middlewares = [metrics_middleware, error_middleware]
    auth = auth_middleware(config.api_key)
    if auth is not None:
        middlewares.append(auth)
    app = web.Application(middlewares=middlewares, client_max_size=state.max_body_bytes)
    app[STATE] = state
    native.add_routes(app)
    embeddings.add_routes(app)  # /v1/embeddings, /encode
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi_json)
    return app
