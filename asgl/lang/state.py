"""ProgramState: what a program writes to (`s += ...`, `await s.gen(...)`) and reads
(`s["name"]`, `s.text()`, `s.messages()`), and what `fn.run()` returns.

Reads wait for the operations queued before them. A `def` program (a thread) blocks; code
running an event loop (an `async def` program) must not block, so there a read of
something not yet generated raises and says to await it (`await s.gen(...)` returns the
value; `await s.wait()` waits for everything queued).
"""

from __future__ import annotations

import asyncio
import queue
from typing import Any, AsyncIterator, Iterator, Optional

from asgl.lang import ir
from asgl.lang.executor import Barrier, Executor, JoinOp, SetVar, StreamEnd
from asgl.lang.generation import gen, gen_int, gen_string, select


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class ProgramState:
    def __init__(self, executor: Executor):
        self._ex = executor
        self.ret_value: Any = None  # what the program function returned
        self._run_error: Optional[BaseException] = None
        self._run_future: Any = None  # the run driving a streamed state

    def __repr__(self) -> str:
        return f"ProgramState(text={self._ex.text[-60:]!r}, vars={sorted(self._ex.vars)})"

    # ------------------------------------------------------------------ writing
    def __iadd__(self, expr: Any) -> "ProgramState":
        self._ex.submit_expr(expr)
        return self

    def gen(self, name: Optional[str] = None, **kwargs: Any) -> "Pending":
        """Queue a generation (`choices=` selects); `await` it for the text (or
        `.result()` in a `def` program)."""
        return Pending(self._ex.submit(gen(name, **kwargs)))

    def gen_int(self, name: Optional[str] = None, **kwargs: Any) -> "Pending":
        return Pending(self._ex.submit(gen_int(name, **kwargs)))

    def gen_string(self, name: Optional[str] = None, **kwargs: Any) -> "Pending":
        return Pending(self._ex.submit(gen_string(name, **kwargs)))

    def select(self, name: Optional[str] = None, choices: Optional[list[str]] = None,
               temperature: float = 0.0, choices_method: Any = None) -> "Pending":
        return Pending(self._ex.submit(select(name, choices, temperature=temperature,
                                              choices_method=choices_method)))

    def fork(self, n: int = 1) -> "ForkGroup":
        """n branches that start from this state's text; they run concurrently."""
        return ForkGroup((ProgramState(child) for child in self._ex.fork(n)), parent=self)

    def var_scope(self, name: str) -> "_VarScope":
        """`with s.var_scope("x"):` (or `async with`): everything written inside the block
        becomes `s["x"]`. `async with` waits for the block's operations on exit, so the
        variable is readable right after it."""
        return _VarScope(self, name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def set_var(self, name: str, value: Any) -> None:
        """Set a variable (after the operations queued before it)."""
        if self._ex.idle:
            with self._ex._lock:
                self._ex.vars[name] = value
        else:
            self._ex.submit(SetVar(name, value))

    def system(self, expr: Any = None) -> Any:
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        return self._role("assistant", expr)

    def _role(self, role: str, expr: Any) -> Any:
        """With content: the role expression (`s += s.user("hi")`); without: a context
        manager (`with s.user(): ...`)."""
        return ir.role(role, expr) if expr is not None else _RoleBlock(self, role)

    # ------------------------------------------------------------------ reading
    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def __contains__(self, name: str) -> bool:
        self._settle()
        return name in self._ex.vars

    def get_var(self, name: str) -> Any:
        if name not in self._ex.vars:
            self._settle(f"variable {name!r}")
        if name in self._ex.vars:
            return self._ex.vars[name]
        if self.error() is not None:
            raise self.error()
        raise KeyError(f"no variable {name!r} in this state; it has {sorted(self._ex.vars)}")

    def get_meta_info(self, name: str) -> dict:
        """What the backend reported for a gen/select: token counts, cached tokens, finish
        reason; for select, the method and the choices' normalized logprobs."""
        self.get_var(name)
        return self._ex.meta.get(name, {})

    def text(self) -> str:
        self._settle("text()")
        return self._ex.text

    def messages(self) -> list[dict]:
        """The finished turns, as OpenAI-style messages."""
        self._settle("messages()")
        return [dict(m) for m in self._ex.messages]

    def images(self) -> list:
        self._settle("images()")
        return list(self._ex.images)

    def error(self) -> Optional[BaseException]:
        return self._run_error or self._ex.error

    def sync(self) -> "ProgramState":
        """Block until every queued operation has run; raises the state's error."""
        self._ex.submit(Barrier()).result()
        return self

    async def wait(self) -> "ProgramState":
        """Wait until every queued operation has run; raises the state's error."""
        await asyncio.wrap_future(self._ex.submit(Barrier()))
        return self

    def _settle(self, what: str = "the state") -> None:
        if self._ex.idle:
            return
        if _in_event_loop():
            raise RuntimeError(f"{what} is not ready: operations are still running. In an "
                               f"async program, `await s.gen(...)` (it returns the text) or "
                               f"`await s.wait()` before reading")
        try:
            self._ex.submit(Barrier()).result()
        except Exception:
            pass  # kept in error(); the read itself says what is missing

    # ------------------------------------------------------------------ streaming
    def text_iter(self, var_name: Optional[str] = None) -> Iterator[str]:
        """The text (or one variable's) piece by piece as it is written, until the program
        ends. Blocks between pieces: in async code use `async for piece in state`."""
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._ex.subscribe(var_name, pieces.put)
        while True:
            item = pieces.get()
            if isinstance(item, StreamEnd):
                if item.error is not None:
                    raise item.error
                return
            yield item

    async def text_async_iter(self, var_name: Optional[str] = None) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        self._ex.subscribe(var_name, lambda item: loop.call_soon_threadsafe(pieces.put_nowait,
                                                                           item))
        while True:
            item = await pieces.get()
            if isinstance(item, StreamEnd):
                if item.error is not None:
                    raise item.error
                return
            yield item

    def __aiter__(self) -> AsyncIterator[str]:
        return self.text_async_iter()


class Pending:
    """An operation already queued: `await` it in async code, `.result()` blocks."""

    def __init__(self, future: Any):
        self._future = future

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    def result(self, timeout: Optional[float] = None) -> Any:
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()


class ForkGroup(list):
    """The branches of `s.fork(n)`: a list of states. `forks += expr` appends to every
    branch; `forks += lambda i: expr` appends `expr(i)` to branch i; a list, item i."""

    def __init__(self, states: Any = (), parent: Optional[ProgramState] = None):
        super().__init__(states)
        self.parent = parent

    def __iadd__(self, other: Any) -> "ForkGroup":  # not list's extend
        if callable(other):
            for i, state in enumerate(self):
                state += other(i)
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self):
                raise ValueError(f"{len(other)} expressions for {len(self)} branches")
            for state, expr in zip(self, other):
                state += expr
        else:
            for state in self:
                state += other
        return self

    def join(self, mode: str = "gather_variable") -> Any:
        """Wait for the branches, then, in the parent: each variable they made as the list
        of their values (`gather_variable`, SGLang's default), or their text appended
        (`concate_and_append`). Blocks in a `def` program; in an `async def` one it
        returns an awaitable: `await forks.join(...)`."""
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"unknown join mode {mode!r}: use 'gather_variable' or "
                             f"'concate_and_append'")
        if self.parent is None:
            pending = None
        else:
            children = [state._ex for state in self]
            pending = Pending(self.parent._ex.submit(JoinOp(children, mode)))
        if _in_event_loop():
            return pending if pending is not None else self.wait()
        if pending is not None:
            pending.result()
        else:
            for state in self:
                state.sync()
        return self

    async def wait(self) -> "ForkGroup":
        await asyncio.gather(*(state.wait() for state in self))
        return self


class _VarScope:
    def __init__(self, state: ProgramState, name: str):
        self._state, self._name = state, name

    def __enter__(self) -> ProgramState:
        self._state += ir.VarScopeBegin(self._name)
        return self._state

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self._state += ir.VarScopeEnd(self._name)

    async def __aenter__(self) -> ProgramState:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            await Pending(self._state._ex.submit(ir.VarScopeEnd(self._name)))


class _RoleBlock:
    def __init__(self, state: ProgramState, role: str):
        self._state, self._role = state, role

    def __enter__(self) -> ProgramState:
        self._state += ir.RoleBegin(self._role)
        return self._state

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self._state += ir.RoleEnd(self._role)
