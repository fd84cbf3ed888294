"""The interpreter's private event loop: one daemon thread that runs every state's
operations and every backend call.

Why one private loop (in a daemon thread): backends hold loop-bound resources (HTTP
sessions, an in-process engine), and `fn.run()` must work from any caller, including one
that already runs an event loop (a notebook, an async server), where it cannot start
another loop in its own thread. So the sync form hands the program to this loop and
blocks on the result; the async form (`await fn.arun()`) runs an `async def` program on
the caller's loop and awaits its operations, which still run here.

This module is the bottom layer of asgl.lang (it imports nothing of it), so the executor
and the backends can use the loop without depending on the program drivers in
interpreter.py.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import weakref
from typing import Any, Coroutine, Optional, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

_lock = threading.Lock()
_loop: Optional[asyncio.AbstractEventLoop] = None
_thread: Optional[threading.Thread] = None


def loop() -> asyncio.AbstractEventLoop:
    """The interpreter's loop, started on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            _loop = asyncio.new_event_loop()
            _thread = threading.Thread(target=_loop.run_forever, name="asgl-lang", daemon=True)
            _thread.start()
        return _loop


def close_at_exit(resource: Any) -> None:
    """`await resource.aclose()` on this loop when Python exits (HTTP sessions, engines)."""
    _resources.add(resource)


_resources: "weakref.WeakSet[Any]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    if _loop is None or not _loop.is_running():
        return
    for resource in list(_resources):
        try:
            asyncio.run_coroutine_threadsafe(resource.aclose(), _loop).result(timeout=10)
        except Exception:  # exiting anyway
            logger.debug("closing %r at exit failed", resource, exc_info=True)


def in_loop_thread() -> bool:
    return _thread is not None and threading.current_thread() is _thread


def call_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the interpreter's loop and wait for it (from any other thread)."""
    if in_loop_thread():
        coro.close()
        raise RuntimeError("a blocking call (fn.run, Runtime()) from code running on asgl's "
                           "interpreter loop would deadlock: in an async program use "
                           "`await fn.arun(...)`")
    return asyncio.run_coroutine_threadsafe(coro, loop()).result()
