"""The language's primitives: `function`, `gen`, `select`, `image`, roles, backends.

    @function
    def qa(s, question):
        s += user(question)
        s += assistant(gen("answer", max_tokens=64))

    @function
    async def qa_async(s, question):
        s += user(question)
        with s.assistant():
            answer = await s.gen("answer", max_tokens=64)

    set_default_backend(RuntimeEndpoint("http://localhost:30000"))
    qa.run(question="...")["answer"]          # or: (await qa_async.arun(question=...))
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any, Callable, Iterator, Optional, Union

from asgl.lang import interpreter, ir, sampling
from asgl.lang.backends.base import Backend
# gen and select live in generation (ProgramState.gen/select need them, and state sits
# below this module); they stay importable from here.
from asgl.lang.generation import gen, gen_int, gen_string, select  # noqa: F401
from asgl.lang.global_config import global_config
from asgl.lang.images import load_image
from asgl.lang.state import ProgramState


def set_default_backend(backend: Backend) -> None:
    global_config.default_backend = backend


def get_default_backend() -> Optional[Backend]:
    return global_config.default_backend


def _backend(backend: Optional[Backend]) -> Backend:
    backend = backend or global_config.default_backend
    if backend is None:
        raise RuntimeError("no backend: call set_default_backend(RuntimeEndpoint(url)) (or "
                           "Runtime(), OpenAI(model), Anthropic(model)), or pass backend=")
    return backend


def flush_cache(backend: Optional[Backend] = None) -> bool:
    """Drop the runtime's prefix cache; False while requests hold cached prefixes."""
    return interpreter.call_sync(_backend(backend).flush_cache())


def get_server_info(backend: Optional[Backend] = None) -> dict:
    return interpreter.call_sync(_backend(backend).get_server_info())


# ---------------------------------------------------------------------- expressions
def image(source: Any) -> ir.Image:
    """An image input: a file path, an http(s)/data URL, or bytes."""
    return ir.Image(load_image(source))


def system(expr: Any = None) -> ir.Concat:
    return ir.role("system", expr)


def user(expr: Any = None) -> ir.Concat:
    return ir.role("user", expr)


def assistant(expr: Any = None) -> ir.Concat:
    return ir.role("assistant", expr)


def system_begin() -> ir.RoleBegin:
    return ir.RoleBegin("system")


def system_end() -> ir.RoleEnd:
    return ir.RoleEnd("system")


def user_begin() -> ir.RoleBegin:
    return ir.RoleBegin("user")


def user_end() -> ir.RoleEnd:
    return ir.RoleEnd("user")


def assistant_begin() -> ir.RoleBegin:
    return ir.RoleBegin("assistant")


def assistant_end() -> ir.RoleEnd:
    return ir.RoleEnd("assistant")


def fork(state: ProgramState, n: int = 1) -> list[ProgramState]:
    return state.fork(n)


# ---------------------------------------------------------------------- programs
def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Program:
    """A function decorated with `@function`: `def` or `async def`, taking the state first."""

    def __init__(self, fn: Callable[..., Any], num_api_spec_tokens: Optional[int] = None):
        if num_api_spec_tokens is not None and num_api_spec_tokens < 1:
            raise ValueError(f"num_api_spec_tokens must be >= 1, got {num_api_spec_tokens}")
        self.num_api_spec_tokens = num_api_spec_tokens
        params = list(inspect.signature(fn).parameters.values())
        if not params:
            raise TypeError(f"{fn.__name__} must take the program state as its first argument")
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn)
        self._signature = inspect.signature(fn)
        self._names = {p.name for p in params[1:]}
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """With a state first (inside a program): run the body on it, so programs compose.
        Without (SGLang's direct call): `.run(...)`; an `async def` program called from
        async code returns `.arun(...)` to await."""
        if args and isinstance(args[0], ProgramState):
            return self.fn(*args, **kwargs)
        if isinstance(kwargs.get("s"), ProgramState):
            return self.fn(**kwargs)
        if self.is_async and _in_event_loop():
            return self.arun(*args, **kwargs)
        return self.run(*args, **kwargs)

    def bind(self, **arguments: Any) -> "Program":
        """A program with some arguments fixed (SGLang's `fn.bind(...)`)."""
        unknown = set(arguments) - self._names
        if unknown:
            raise TypeError(f"{self.__name__} has no parameter(s) {', '.join(sorted(unknown))}")
        program = Program(functools.partial(self.fn, **arguments), self.num_api_spec_tokens)
        program.is_async = self.is_async
        program.__name__ = self.__name__
        return program

    def _bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, dict]:
        """(positional args, keyword args, sampling defaults); a wrong call fails here."""
        program_kwargs, defaults = sampling.split_run_kwargs(kwargs, self._names)
        bound = self._signature.bind(None, *args, **program_kwargs)
        return bound.args[1:], bound.kwargs, defaults

    def run(self, *args: Any, backend: Optional[Backend] = None, stream: bool = False,
            **kwargs: Any) -> ProgramState:
        """Run to completion and return the state (raises the program's error). Sampling
        parameters given here (`temperature=0`, `max_new_tokens=...`) are defaults for
        every gen. With `stream=True` it returns at once: follow `state.text_iter()`."""
        args, kwargs, defaults = self._bind(args, kwargs)
        return interpreter.run(self, args, kwargs, _backend(backend), defaults, stream)

    async def arun(self, *args: Any, backend: Optional[Backend] = None, stream: bool = False,
                   **kwargs: Any) -> ProgramState:
        """`run` for async code; with `stream=True`, iterate with `async for piece in state`."""
        args, kwargs, defaults = self._bind(args, kwargs)
        return await interpreter.arun(self, args, kwargs, _backend(backend), defaults, stream)

    def _batch(self, batch: list, kwargs: dict) -> list[tuple[tuple, dict, dict]]:
        """(args, kwargs, sampling defaults) per program; an item may set its own defaults."""
        program_kwargs, defaults = sampling.split_run_kwargs(kwargs, set())
        if program_kwargs:
            raise TypeError(f"unknown run_batch options: {', '.join(program_kwargs)}")
        calls = []
        for item in batch:
            a, k = ((), dict(item)) if isinstance(item, dict) else (tuple(item), {})
            a, k, own = self._bind(a, k)
            calls.append((a, k, {**defaults, **own}))
        return calls

    def run_batch(self, batch: list, *, backend: Optional[Backend] = None,
                  progress_bar: bool = False, max_concurrency: Optional[int] = None,
                  num_threads: Union[int, str, None] = None, generator_style: bool = False,
                  **kwargs: Any) -> Union[list[ProgramState], Iterator[ProgramState]]:
        """Run every program of `batch` (dicts of arguments) concurrently, at most
        `max_concurrency` at a time (`num_threads` is SGLang's name for it), so the
        runtime batches them. Failed programs keep their error in `state.error()`. With
        `generator_style=True`, a generator of the states in the batch's order, each as it
        finishes. On the runtimes, the prefix every program starts with is cached first
        (`global_config.enable_precache_with_tracing`)."""
        limit = max_concurrency or (num_threads if isinstance(num_threads, int) else None)
        calls = self._batch(batch, kwargs)
        if generator_style:
            return interpreter.iter_batch(self, calls, _backend(backend), limit, progress_bar)
        return interpreter.run_batch(self, calls, _backend(backend), limit, progress_bar)

    def arun_batch(self, batch: list, *, backend: Optional[Backend] = None,
                   progress_bar: bool = False, max_concurrency: Optional[int] = None,
                   num_threads: Union[int, str, None] = None, generator_style: bool = False,
                   **kwargs: Any) -> Any:
        """`run_batch` for async code: `await fn.arun_batch(...)` for the list, or
        `async for state in fn.arun_batch(..., generator_style=True)`."""
        limit = max_concurrency or (num_threads if isinstance(num_threads, int) else None)
        calls = self._batch(batch, kwargs)
        if generator_style:
            return interpreter.aiter_batch(self, calls, _backend(backend), limit,
                                           progress_bar)
        return interpreter.arun_batch(self, calls, _backend(backend), limit, progress_bar)


def function(fn: Optional[Callable[..., Any]] = None, *,
             num_api_spec_tokens: Optional[int] = None, **options: Any) -> Any:
    """Decorate a program: `@function`, `@function()`, or `@function(num_api_spec_tokens=N)`
    (API speculative execution: a gen with a stop generates N tokens ahead, and the
    program's next text and gens are matched against them before another call)."""
    if options:
        raise TypeError(f"unknown function options: {', '.join(options)}")
    if fn is None:
        return functools.partial(Program, num_api_spec_tokens=num_api_spec_tokens)
    return Program(fn, num_api_spec_tokens)
