"""The interpreter: the drivers behind `fn.run`, `fn.run_batch` and their async twins.

Every state's operations and every backend call run on one private event loop (see
event_loop.py for why). The sync form hands the program to that loop and blocks on the
result; the async form (`await fn.arun()`) runs an `async def` program on the caller's
loop and awaits its operations, which still run there. A `def` program is ordinary
blocking code: it runs in a worker thread, submitting operations to the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import logging
import threading
from typing import TYPE_CHECKING, Any, Optional

# loop, close_at_exit, in_loop_thread and call_sync live in event_loop (so the executor
# and the backends need not import this module); they stay importable from here.
from asgl.lang.event_loop import call_sync, close_at_exit, in_loop_thread, loop
from asgl.lang.executor import Executor
from asgl.lang.state import ProgramState

if TYPE_CHECKING:
    from asgl.lang.api import Program
    from asgl.lang.backends.base import Backend

__all__ = ["arun", "arun_batch", "call_sync", "close_at_exit", "execute", "in_loop_thread",
           "loop", "new_state", "run", "run_batch"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_bodies: Optional[cf.ThreadPoolExecutor] = None
# Threads for `def` program bodies. A body only blocks when it reads a value still being
# generated, so a batch needs about as many threads as programs that read mid-way.
_MAX_BODY_THREADS = 256


def _body_pool() -> cf.ThreadPoolExecutor:
    global _bodies
    with _lock:
        if _bodies is None:
            _bodies = cf.ThreadPoolExecutor(_MAX_BODY_THREADS, thread_name_prefix="asgl-program")
        return _bodies


def new_state(backend: "Backend", defaults: dict, stream: bool = False) -> "ProgramState":
    return ProgramState(Executor(backend, defaults, stream=stream))


async def execute(program: "Program", state: "ProgramState", args: tuple,
                  kwargs: dict) -> "ProgramState":
    """Run the program's body, then wait for every operation it queued (branches too).
    Works on any loop."""
    ex = state._ex
    error: Optional[BaseException] = None
    try:
        if program.is_async:
            state.ret_value = await program.fn(state, *args, **kwargs)
        else:
            call = functools.partial(program.fn, state, *args, **kwargs)
            state.ret_value = await asyncio.get_running_loop().run_in_executor(_body_pool(), call)
        await asyncio.wrap_future(ex.finish())
    except BaseException as e:
        error = state._run_error = e
        ex.abandon(e)
        raise
    finally:
        ex.close_stream(error)
    return state


def run(program: "Program", args: tuple, kwargs: dict, backend: "Backend", defaults: dict,
        stream: bool) -> "ProgramState":
    state = new_state(backend, defaults, stream)
    if stream:  # the program runs on; text_iter() follows it
        if in_loop_thread():
            raise RuntimeError("fn.run(stream=True) on asgl's loop: use `await fn.arun(...)`")
        state._run_future = asyncio.run_coroutine_threadsafe(
            execute(program, state, args, kwargs), loop())
        state._run_future.add_done_callback(_consume_error)
        return state
    return call_sync(execute(program, state, args, kwargs))


async def arun(program: "Program", args: tuple, kwargs: dict, backend: "Backend",
               defaults: dict, stream: bool) -> "ProgramState":
    state = new_state(backend, defaults, stream)
    if stream:
        state._run_future = asyncio.ensure_future(execute(program, state, args, kwargs))
        state._run_future.add_done_callback(_consume_error)
        return state
    return await execute(program, state, args, kwargs)


async def arun_batch(program: "Program", calls: list[tuple[tuple, dict, dict]],
                     backend: "Backend", max_concurrency: Optional[int],
                     progress_bar: bool) -> list["ProgramState"]:
    """Every program at once (up to `max_concurrency`), so the runtime batches them
    continuously. A failed program's state holds its error (`state.error()`)."""
    from tqdm import tqdm

    limit = asyncio.Semaphore(max_concurrency or max(len(calls), 1))
    bar = tqdm(total=len(calls), desc=program.__name__, disable=not progress_bar)

    async def one(args: tuple, kwargs: dict, defaults: dict) -> "ProgramState":
        state = new_state(backend, defaults)
        async with limit:
            try:
                await execute(program, state, args, kwargs)
            except Exception:
                pass  # kept in state.error()
            bar.update(1)
        return state

    try:
        states = await asyncio.gather(*(one(*call) for call in calls))
    finally:
        bar.close()
    failed = [s for s in states if s.error() is not None]
    if failed:
        logger.warning("%d of %d programs failed; the first error: %r", len(failed),
                       len(states), failed[0].error())
    return list(states)


def run_batch(program: "Program", calls: list[tuple[tuple, dict, dict]], backend: "Backend",
              max_concurrency: Optional[int], progress_bar: bool) -> list["ProgramState"]:
    return call_sync(arun_batch(program, calls, backend, max_concurrency, progress_bar))


def _consume_error(future: Any) -> None:
    # A streamed run reports its error through text_iter(); don't log it as unretrieved.
    if not future.cancelled():
        future.exception()
