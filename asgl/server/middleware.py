"""Middlewares, outermost first: metrics (status per route), errors (every failure becomes
an OpenAI-style error body; a 500 only for a bug, with a request id), auth (bearer key on
every route but /health, unknown routes included: deny by default; the admin routes behind
their own key when --admin-api-key is set).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Awaitable, Callable, Optional

from aiohttp import web

from asgl.server.errors import ApiError, classify, error_response, internal_error
from asgl.server.state import get_state

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC_PATHS = frozenset({"/health"})
# Routes that act on the server or on other users' requests, or show its configuration:
# behind --admin-api-key when it is set.
ADMIN_PATHS = frozenset({"/flush_cache", "/abort_request", "/get_server_info"})
CLIENT_GONE = 499  # nginx's code for "the client closed the connection first"


def _route_label(request: web.Request) -> str:
    # Label by route pattern, never by raw path: unknown paths must not grow the series.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = get_state(request).metrics
    metrics.in_flight.inc()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        status = CLIENT_GONE
        raise
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        metrics.in_flight.dec()
        metrics.requests.labels(_route_label(request), str(status)).inc()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # aiohttp's own errors (404, 405, 413 from reading a body) in our body shape
        headers = {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        return error_response(e.status, message, headers=headers or None)
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client is gone: nobody to answer
    except Exception as e:  # RecursionError and MemoryError too: they end here, not the server
        err = classify(e)
        if err is None:
            return internal_error(request, e)
        return error_response(err.status, err.message, err.param, err.code, err.headers)


def auth_middleware(api_key: Optional[str],
                    admin_api_key: Optional[str] = None) -> Optional[Callable]:
    """Bearer keys: --api-key on every route but /health; with --admin-api-key, the admin
    routes (ADMIN_PATHS) take that key only, and it opens every other route too."""
    if not api_key and not admin_api_key:
        return None
    user = f"Bearer {api_key}".encode() if api_key else None
    admin = f"Bearer {admin_api_key}".encode() if admin_api_key else None

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path not in PUBLIC_PATHS:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            is_admin = admin is not None and hmac.compare_digest(given, admin)
            if admin is not None and path in ADMIN_PATHS:
                if not is_admin:
                    raise ApiError(401 if not given else 403,
                                   "this admin route needs the admin key (--admin-api-key): "
                                   "send 'Authorization: Bearer <admin key>'",
                                   code="invalid_admin_key")
            elif user is not None and not is_admin and not hmac.compare_digest(given, user):
                raise ApiError(401, "invalid or missing API key: send the header "
                               "'Authorization: Bearer <key>'", code="invalid_api_key")
        return await handler(request)

    return check_key
