"""Executor: one program state's operations, run in order on the interpreter's event loop.

The program (a thread for `def` programs, a coroutine for `async def` ones) only submits
operations: `s += x` queues them and returns; `await s.gen(...)` queues one and awaits its
result; reading `s["x"]` in a `def` program blocks until the queue has reached it. Each
state has its own queue, so forked branches (each a state) run concurrently.

Thread rules: `submit`, `fork`, `subscribe` and the counters may be used from any thread;
everything else runs on the interpreter's loop. `_lock` guards the text against stream
subscribers reading it from other threads, and the count of queued operations.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from asgl.lang import event_loop, ir, sampling
from asgl.lang.backends.base import Backend, GenResult, Prompt, typed_generate
from asgl.lang.chat import ChatTemplate, text_only
from asgl.lang.images import ImageData


class ProgramError(RuntimeError):
    """A program used the language wrongly (e.g. roles out of order)."""


class Barrier:
    """An operation that does nothing: its completion means every earlier one is done."""


@dataclass(eq=False)
class ForkOp:
    children: list["Executor"]


@dataclass(eq=False)
class JoinOp:
    """`forks.join(mode)` on the parent: wait for the branches, then gather their new
    variables (as lists) or append their text (`concate_and_append`)."""
    children: list["Executor"]
    mode: str


@dataclass(eq=False)
class SetVar:
    name: str
    value: Any


@dataclass
class StreamEnd:
    error: Optional[BaseException] = None


class Executor:
    def __init__(self, backend: Backend, defaults: dict, *, stream: bool = False,
                 ready: bool = True, spec_tokens: Optional[int] = None):
        self.backend = backend
        self.defaults = defaults
        # API speculative execution (`@function(num_api_spec_tokens=N)`): one call generates
        # N tokens past a gen's stop; later gens and texts are matched against `_speculated`.
        self.spec_tokens = spec_tokens
        self._speculated = ""
        self._scopes: dict[str, int] = {}  # var_scope name -> where it starts in `text`
        self.fork_start = 0  # a branch: the length of its parent's text when it forked
        self.stream = stream  # generate with the backend's streaming API (text_iter)
        self.loop = event_loop.loop()
        self.text = ""
        self.vars: dict[str, Any] = {}
        self.meta: dict[str, dict] = {}
        self.messages: list[dict] = []
        self.images: list[ImageData] = []
        self.role: Optional[str] = None  # the open role
        self._role_start = 0  # where its content starts in `text`
        self._role_images: list[tuple[int, ImageData]] = []  # (offset in content, image)
        self._chat_text = ""  # the turns as written: openings, contents, closings
        self.error: Optional[BaseException] = None
        self.children: list[Executor] = []
        self._template: Optional[ChatTemplate] = None
        self._ops: deque = deque()
        self._task: Optional[asyncio.Task] = None
        self._ready = ready  # a fork branch waits for its parent's state
        self._submitted = 0  # operations queued (under _lock)
        self._completed = 0  # operations done (on the loop only)
        self._lock = threading.Lock()
        self._subs: list[tuple[Optional[str], Callable[[Any], None]]] = []
        self._partial: dict[str, str] = {}  # variables being streamed
        self._closed: Optional[StreamEnd] = None

    # ------------------------------------------------------------------ any thread
    def submit(self, op: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        with self._lock:  # a reader's barrier may come from another thread than the program
            self._submitted += 1
        self.loop.call_soon_threadsafe(self._enqueue, op, future)
        return future

    def submit_expr(self, expr: Any) -> None:
        ops = ir.flatten(expr)  # type errors surface here, before anything is queued
        # One expression's operations reach the queue together: a whole assistant turn
        # (`s += assistant(...)`) is there when its first operation runs (chat speculation)
        with self._lock:
            self._submitted += len(ops)
        self.loop.call_soon_threadsafe(self._enqueue_many, [(op, cf.Future()) for op in ops])

    @property
    def idle(self) -> bool:
        return self._completed >= self._submitted

    def fork(self, n: int) -> list["Executor"]:
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}")
        children = [Executor(self.backend, self.defaults, ready=False) for _ in range(n)]
        self.children.extend(children)
        self.submit(ForkOp(children))
        return children

    def finish(self) -> cf.Future:
        """Done when this state and its branches have run every operation."""
        return asyncio.run_coroutine_threadsafe(self._finish(), self.loop)

    def abandon(self, error: BaseException) -> None:
        """The program failed: fail what is still queued instead of running it."""
        self.loop.call_soon_threadsafe(self._set_error, error)

    def subscribe(self, var: Optional[str], push: Callable[[Any], None]) -> None:
        """`push` gets the text so far (of `var`, or all), then each new piece, then a
        StreamEnd."""
        with self._lock:
            backlog = self.text if var is None else self.vars.get(var, self._partial.get(var))
            if backlog:
                push(str(backlog))
            if self._closed is not None:
                push(self._closed)
            else:
                self._subs.append((var, push))

    def close_stream(self, error: Optional[BaseException] = None) -> None:
        with self._lock:
            self._closed = StreamEnd(error)
            for _, push in self._subs:
                push(self._closed)
            self._subs.clear()
        for child in self.children:
            child.close_stream(error)

    # ------------------------------------------------------------------ the loop
    def _enqueue(self, op: Any, future: cf.Future) -> None:
        self._ops.append((op, future))
        self._kick()

    def _enqueue_many(self, items: list) -> None:
        self._ops.extend(items)
        self._kick()

    def _kick(self) -> None:
        if self._ready and self._task is None and self._ops:
            self._task = self.loop.create_task(self._drain())

    def _set_error(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error

    async def _drain(self) -> None:
        try:
            while self._ops:
                op, future = self._ops.popleft()
                result, error = None, self.error
                if error is None:
                    try:
                        result = await self._run(op)
                        if self._speculates_turn(op):
                            await self._spec_turn()
                    except Exception as e:
                        error = self.error = e
                if error is not None and isinstance(op, ForkOp):
                    for child in op.children:  # they will never get a state: fail them
                        child._set_error(error)
                        child._start()
                self._completed += 1
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)
        finally:
            self._task = None
            self._kick()  # operations that arrived as we were finishing

    async def _finish(self) -> None:
        await asyncio.wrap_future(self.submit(Barrier()))
        for child in list(self.children):
            await child._finish()

    async def _run(self, op: Any) -> Any:
        if isinstance(op, str):
            self._append(op)
        elif isinstance(op, ir.Gen):
            return await self._gen(op)
        elif isinstance(op, ir.Select):
            return await self._select(op)
        elif isinstance(op, ir.RoleBegin):
            await self._role_begin(op.role)
        elif isinstance(op, ir.RoleEnd):
            await self._role_end(op.role)
        elif isinstance(op, ir.Image):
            self._image(op.data, await self.backend.image_token())
        elif isinstance(op, ForkOp):
            await self._fork(op.children)
        elif isinstance(op, ir.VarScopeBegin):
            self._scopes[op.name] = len(self.text)
        elif isinstance(op, ir.VarScopeEnd):
            if op.name not in self._scopes:
                raise ProgramError(f"var_scope {op.name!r} ends without beginning")
            self._store(op.name, self.text[self._scopes.pop(op.name):], {})
            return self.vars[op.name]
        elif isinstance(op, JoinOp):
            await self._join(op.children, op.mode)
        elif isinstance(op, SetVar):
            self._store(op.name, op.value, self.meta.get(op.name, {}))
        elif not isinstance(op, Barrier):
            raise TypeError(f"unknown operation {op!r}")
        return None

    # ------------------------------------------------------------------ operations
    def _append(self, text: str, var: Optional[str] = None) -> None:
        if not text:
            return
        if var is None and self._speculated:  # program text: does the speculation agree?
            if self._speculated.startswith(text):
                self._speculated = self._speculated[len(text):]
            else:
                self._speculated = ""
        with self._lock:
            self.text += text
            if var is not None:
                self._partial[var] = self._partial.get(var, "") + text
            for sub_var, push in self._subs:
                if sub_var is None or sub_var == var:
                    push(text)

    def _store(self, name: Optional[str], value: str, meta: dict) -> None:
        if name is not None:
            with self._lock:
                self.vars[name] = value
                self.meta[name] = meta
                self._partial.pop(name, None)

    async def _gen(self, op: ir.Gen) -> str:
        params = sampling.merge(self.defaults, op.params)
        prompt = self._prompt()
        if op.dtype is not None or not self.stream:
            if op.dtype is not None:
                result = await typed_generate(self.backend, prompt, params, op.dtype)
            elif self.spec_tokens and not prompt.has_roles:
                result = await self._spec_gen(prompt, params)
            else:
                result = await self.backend.generate(prompt, params)
            self.backend.token_usage.add(result.meta)
            self._append(result.text, op.name)
            text, meta = result.text, result.meta
        else:
            pieces, meta = [], {}
            async for event in self.backend.stream(prompt, params):
                pieces.append(event.text)
                self._append(event.text, op.name)
                if event.meta is not None:
                    meta = event.meta
            text = "".join(pieces)
            self.backend.token_usage.add(meta)
        self._store(op.name, text, meta)
        return text

    async def _spec_gen(self, prompt: Prompt, params: dict) -> GenResult:
        """A gen served from the speculated continuation when it holds one of the gen's
        stops; else one call with no stop that generates `spec_tokens` ahead (SGLang's API
        speculative execution: what follows the stop is matched against the program's next
        text and gens)."""
        stops = sampling.stop_list(params)
        if not stops:  # no stop to cut at: nothing to speculate past
            return await self.backend.generate(prompt, params)
        meta: dict = {"speculative": "hit"}
        if not self._speculated:
            ahead = {k: v for k, v in params.items() if k != "stop"}
            ahead["max_new_tokens"] = max(params["max_new_tokens"], self.spec_tokens)
            out = await self.backend.generate(prompt, ahead)
            self._speculated, meta = out.text, {**out.meta, "speculative": "call"}
        # no stop in what was generated: the gen takes all of it (the call was bounded)
        text, _ = sampling.truncate_at_stop(self._speculated, stops)
        self._speculated = self._speculated[len(text):]
        return GenResult(text, meta)

    def _speculates_turn(self, op: Any) -> bool:
        """An assistant turn of a chat-API backend under `num_api_spec_tokens`, queued whole
        (texts and gens only, up to its end): generated by one call (SGLang's chat API
        speculative execution). Otherwise the turn runs op by op."""
        if not (self.spec_tokens and isinstance(op, ir.RoleBegin) and op.role == "assistant"
                and getattr(self.backend, "chat_speculation", None) is not None
                and self.backend.chat_speculation(self._prompt())):
            return False
        for queued, _ in self._ops:
            if isinstance(queued, ir.RoleEnd) and queued.role == "assistant":
                return True
            if not isinstance(queued, (str, ir.Gen)) or (
                    isinstance(queued, ir.Gen) and queued.dtype is not None):
                return False
        return False

    async def _spec_turn(self) -> None:
        turn = []
        while not isinstance(self._ops[0][0], ir.RoleEnd):
            turn.append(self._ops.popleft())
        gens = [op for op, _ in turn if isinstance(op, ir.Gen)]
        if not gens:  # only text: nothing to generate
            self._ops.extendleft(reversed(turn))
            return
        params = sampling.merge(self.defaults, gens[0].params)
        params = {k: v for k, v in params.items() if k not in ("stop", "regex", "json_schema")}
        params["max_new_tokens"] = max(self.spec_tokens, params["max_new_tokens"])
        try:
            out = await self.backend.generate(self._prompt(), params)
        except BaseException:
            self._ops.extendleft(reversed(turn))  # the drain fails them with the error
            raise
        self.backend.token_usage.add(out.meta)
        rest = out.text
        for i, (op, future) in enumerate(turn):
            if isinstance(op, str):
                # the model was to write this text: skip past it where it did
                at = rest.find(op)
                if at == 0 or (at > 0 and i == 0):
                    rest = rest[at + len(op):]
                self._append(op)
                value = None
            else:
                last = not any(isinstance(o, ir.Gen) for o, _ in turn[i + 1:])
                stops = sampling.stop_list(sampling.merge(self.defaults, op.params))
                value, _ = (rest, None) if last and not stops else \
                    sampling.truncate_at_stop(rest, stops)
                rest = rest[len(value):]
                self._append(value, op.name)
                self._store(op.name, value, {**out.meta, "speculative": "chat"})
            self._completed += 1
            future.set_result(value)

    async def _select(self, op: ir.Select) -> str:
        self._speculated = ""  # a select's choice is not matched against speculation
        params = {"temperature": op.temperature}
        if op.choices_method is not None:
            params["choices_method"] = op.choices_method
        result = await self.backend.select(self._prompt(), op.choices, params)
        self.backend.token_usage.add(result.meta)
        self._append(result.choice, op.name)
        self._store(op.name, result.choice, result.meta)
        return result.choice

    async def _chat_template(self) -> ChatTemplate:
        if self._template is None:
            self._template = await self.backend.chat_template()
        return self._template

    async def _role_begin(self, role: str) -> None:
        if self.role is not None:
            raise ProgramError(f"cannot begin a {role!r} turn while the {self.role!r} turn is "
                               f"open: end it first")
        template = await self._chat_template()
        prefix = template.prefix(text_only(self.messages), self._chat_text, role)
        self._append(prefix)
        self._chat_text += prefix
        self.role, self._role_start, self._role_images = role, len(self.text), []

    async def _role_end(self, role: str) -> None:
        if self.role != role:
            raise ProgramError(f"{role}_end() without an open {role!r} turn (open: {self.role!r})")
        template = await self._chat_template()
        history = text_only(self.messages)
        message = {"role": role, "content": self._open_content()}
        self.messages.append(message)
        self.role = None
        suffix = template.suffix(history, role)
        self._append(suffix)
        self._chat_text += text_only([message])[0]["content"] + suffix

    def _open_content(self) -> Any:
        """The open role's content: text, or OpenAI-style parts when it holds images."""
        text = self.text[self._role_start:]
        if not self._role_images:
            return text
        parts, pos = [], 0
        for offset, image in self._role_images:
            if offset > pos:
                parts.append({"type": "text", "text": text[pos:offset]})
            parts.append(image.openai_part())
            pos = offset
        if pos < len(text):
            parts.append({"type": "text", "text": text[pos:]})
        return parts

    def _image(self, image: ImageData, token: Optional[str] = None) -> None:
        """Record an image; `token` (a native backend serving a vision model: its image
        placeholder) goes into the text where the image stands."""
        self.images.append(image)
        if self.role is not None:
            self._role_images.append((len(self.text) - self._role_start, image))
        if token:
            self._append(token)

    def _prompt(self) -> Prompt:
        return Prompt(self.text, list(self.messages), self.role,
                      self._open_content() if self.role is not None else "", list(self.images))

    async def _fork(self, children: list["Executor"]) -> None:
        for child in children:
            child._copy_from(self)
        if len(children) > 1:
            # Branches start together: have the shared prefix cached first, so it is
            # computed once rather than by every branch at the same time.
            await self.backend.cache_prefix(self._prompt())
        for child in children:
            child._start()

    async def _join(self, children: list["Executor"], mode: str) -> None:
        for child in children:
            await child._finish()
            if child.error is not None:
                raise child.error
        if mode == "gather_variable":
            # SGLang's default join: each variable the branches made becomes, in the
            # parent, the list of the branches' values
            new: dict[str, list] = {}
            for child in children:
                for name, value in child.vars.items():
                    if name not in self.vars:
                        new.setdefault(name, []).append(value)
            for name, values in new.items():
                self._store(name, values, {})
        elif mode == "concate_and_append":
            # What the branches wrote after the fork, appended in order. SGLang's runtime
            # also concatenates their KV caches; here the next request's prefix is served
            # by the radix cache where it can be (docs/frontend.md).
            self._append("".join(c.text[c.fork_start:] for c in children))
        else:
            raise ValueError(f"unknown join mode {mode!r}: use 'gather_variable' or "
                             f"'concate_and_append'")

    def _copy_from(self, parent: "Executor") -> None:
        self.fork_start = len(parent.text)
        self.text, self.vars, self.meta = parent.text, dict(parent.vars), dict(parent.meta)
        self.messages, self.images = list(parent.messages), list(parent.images)
        self.role, self._role_start = parent.role, parent._role_start
        self._chat_text = parent._chat_text
        self._role_images = list(parent._role_images)
        self._template, self.stream = parent._template, parent.stream

    def _start(self) -> None:
        self._ready = True
        self._kick()
