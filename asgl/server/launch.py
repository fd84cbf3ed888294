"""`asgl serve`: start the engine, serve HTTP on uvloop, shut down gracefully on SIGTERM.

Shutdown order: stop accepting connections and answer new requests on open connections
with 503; let in-flight requests finish for up to `GRACEFUL_SHUTDOWN_S`; then cancel the
rest (which aborts their engine requests); then stop the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Optional

from aiohttp import web

from asgl.config import EngineConfig
from asgl.server.app import build_app
from asgl.server.state import STATE

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 30.0


def run_server(config: EngineConfig) -> None:
    if config.node_rank > 0:
        # A node other than 0 runs only its tensor-parallel ranks; node 0 serves HTTP.
        from asgl.engine.worker.tp_launch import run_node
        raise SystemExit(run_node(config))
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover (Windows)
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config))


async def serve(config: EngineConfig, stop: Optional[asyncio.Event] = None) -> None:
    """Serve until SIGTERM/SIGINT (or until `stop` is set, for embedding)."""
    from asgl.engine.loop.engine import Engine

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():  # a second Ctrl-C: don't wait for the grace period
            logger.warning("%s again: exiting now", sig.name)
            os._exit(1)
        logger.info("%s received", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    if config.dp_size > 1:  # replicas in processes behind this server (asgl/engine/dp.py)
        from asgl.engine.dp.engine import DPEngine
        engine = DPEngine(config)
    else:
        engine = Engine(config)
    await engine.start()
    app = build_app(engine, config)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its
    # engine request (aiohttp leaves handlers running by default).
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=GRACEFUL_SHUTDOWN_S,
                           access_log=logging.getLogger("aiohttp.access")
                           if config.log_requests else None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as e:
            logger.error("cannot listen on %s:%d: %s", config.host, config.port, e)
            raise SystemExit(1) from None
        logger.info("asgl is serving %s on http://%s:%d (context %d tokens)",
                    app[STATE].model_name, config.host, config.port, engine.context_len)
        await stop.wait()
        logger.info("shutting down: finishing in-flight requests (up to %.0f s)",
                    GRACEFUL_SHUTDOWN_S)
        app[STATE].draining = True
    finally:
        await runner.cleanup()
        await engine.shutdown()
        logger.info("stopped")
