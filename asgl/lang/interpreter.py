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
import os
import threading
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Optional

# loop, close_at_exit, in_loop_thread and call_sync live in event_loop (so the executor
# and the backends need not import this module); they stay importable from here.
from asgl.lang.event_loop import call_sync, close_at_exit, in_loop_thread, loop
from asgl.lang.backends.base import Backend as _Backend
from asgl.lang.backends.base import Prompt
from asgl.lang.executor import Executor
from asgl.lang.global_config import global_config
from asgl.lang.state import ProgramState

if TYPE_CHECKING:
    from asgl.lang.api import Program
    from asgl.lang.backends.base import Backend

__all__ = ["aiter_batch", "arun", "arun_batch", "call_sync", "close_at_exit", "execute",
           "in_loop_thread", "iter_batch", "loop", "new_state", "run", "run_batch"]

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


def new_state(backend: "Backend", defaults: dict, stream: bool = False,
              spec_tokens: Optional[int] = None) -> "ProgramState":
    return ProgramState(Executor(backend, defaults, stream=stream, spec_tokens=spec_tokens))


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
    if global_config.verbosity >= 2:  # SGLang's switch: show each finished program
        print(ex.text)
    return state


def run(program: "Program", args: tuple, kwargs: dict, backend: "Backend", defaults: dict,
        stream: bool) -> "ProgramState":
    state = new_state(backend, defaults, stream, program.num_api_spec_tokens)
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
    state = new_state(backend, defaults, stream, program.num_api_spec_tokens)
    if stream:
        state._run_future = asyncio.ensure_future(execute(program, state, args, kwargs))
        state._run_future.add_done_callback(_consume_error)
        return state
    return await execute(program, state, args, kwargs)


async def aiter_batch(program: "Program", calls: list[tuple[tuple, dict, dict]],
                      backend: "Backend", max_concurrency: Optional[int],
                      progress_bar: bool) -> AsyncIterator["ProgramState"]:
    """Every program at once (up to `max_concurrency`), so the runtime batches them
    continuously; their states in the batch's order, each as soon as it (and those before
    it) finished. A failed program's state holds its error (`state.error()`)."""
    from tqdm import tqdm

    await precache(program, calls, backend)
    limit = asyncio.Semaphore(max_concurrency or max(len(calls), 1))
    bar = tqdm(total=len(calls), desc=program.__name__, disable=not progress_bar)

    async def one(args: tuple, kwargs: dict, defaults: dict) -> "ProgramState":
        state = new_state(backend, defaults, spec_tokens=program.num_api_spec_tokens)
        async with limit:
            try:
                await execute(program, state, args, kwargs)
            except Exception:
                pass  # kept in state.error()
            bar.update(1)
        return state

    tasks = [asyncio.ensure_future(one(*call)) for call in calls]
    failed = []
    try:
        for task in tasks:
            state = await task
            if state.error() is not None:
                failed.append(state)
            yield state
    finally:
        for task in tasks:  # the consumer stopped early: don't leave programs running
            task.cancel()
        bar.close()
    if failed:
        logger.warning("%d of %d programs failed; the first error: %r", len(failed),
                       len(calls), failed[0].error())


async def arun_batch(program: "Program", calls: list[tuple[tuple, dict, dict]],
                     backend: "Backend", max_concurrency: Optional[int],
                     progress_bar: bool) -> list["ProgramState"]:
    return [state async for state in aiter_batch(program, calls, backend, max_concurrency,
                                                 progress_bar)]


def run_batch(program: "Program", calls: list[tuple[tuple, dict, dict]], backend: "Backend",
              max_concurrency: Optional[int], progress_bar: bool) -> list["ProgramState"]:
    return call_sync(arun_batch(program, calls, backend, max_concurrency, progress_bar))


def iter_batch(program: "Program", calls: list[tuple[tuple, dict, dict]], backend: "Backend",
               max_concurrency: Optional[int], progress_bar: bool) -> Iterator["ProgramState"]:
    """`run_batch(generator_style=True)`: the states one by one, while the rest run on."""
    states = aiter_batch(program, calls, backend, max_concurrency, progress_bar)
    try:
        while True:
            try:
                yield call_sync(states.__anext__())
            except StopAsyncIteration:
                return
    finally:
        call_sync(states.aclose())


# ---------------------------------------------------------------------- shared prefix
class _TraceStop(Exception):
    """Raised at a traced program's first request: its prompt so far is known."""


class _Tracer(_Backend):
    """Runs a program's body up to its first gen/select, recording the prompt there; only
    the chat template comes from the real backend."""

    def __init__(self, backend: "Backend"):
        self.backend = backend
        self.prompt: Optional[Prompt] = None

    async def chat_template(self) -> Any:
        return await self.backend.chat_template()

    async def generate(self, prompt: Prompt, params: dict) -> Any:
        self.prompt = prompt
        raise _TraceStop()

    async def stream(self, prompt: Prompt, params: dict) -> Any:
        self.prompt = prompt
        raise _TraceStop()
        yield  # an async generator, as backends' stream is

    async def select(self, prompt: Prompt, choices: list[str], params: dict) -> Any:
        self.prompt = prompt
        raise _TraceStop()


_MIN_PREFIX_CHARS = 64  # as SGLang: a shorter shared prefix is not worth a request


async def precache(program: "Program", calls: list[tuple[tuple, dict, dict]],
                   backend: "Backend") -> Optional[str]:
    """The shared-prefix hint (SGLang's `enable_precache_with_tracing`): trace every
    program of the batch to its first request, and have the runtime cache the text they
    all start with, so it is prefilled once before the batch floods in. The traced bodies
    run up to their first gen (code there runs twice). Returns the prefix cached."""
    if (not global_config.enable_precache_with_tracing or len(calls) < 2
            or not getattr(backend, "scores_choices", False)):  # the runtimes only
        return None
    prompts = []
    for args, kwargs, defaults in calls:
        tracer = _Tracer(backend)
        try:
            await execute(program, new_state(tracer, defaults), args, kwargs)
        except Exception:
            pass  # _TraceStop, or an error the real run will report
        if tracer.prompt is None or tracer.prompt.images:
            return None
        prompts.append(tracer.prompt.text)
    prefix = os.path.commonprefix(prompts)
    if len(prefix) < _MIN_PREFIX_CHARS:
        return None
    await backend.cache_prefix(Prompt(prefix, []))
    return prefix


def _consume_error(future: Any) -> None:
    # A streamed run reports its error through text_iter(); don't log it as unretrieved.
    if not future.cancelled():
        future.exception()
