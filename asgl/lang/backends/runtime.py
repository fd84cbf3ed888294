"""Runtime: an `asgl.Engine` in this process, no server in between.

`Runtime()` starts an engine (the embedded SmolLM2 unless `model_path=` says otherwise) on
the interpreter's loop, where programs run; `Runtime(engine=e)` uses an engine you already
started, on whatever loop it runs (calls are handed to that loop).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

from asgl.lang import event_loop
from asgl.lang.backends.base import StreamEvent
from asgl.lang.backends.native import NativeBackend, NativeOutput
from asgl.lang.chat import ChatTemplate, JinjaChatTemplate, PlainChatTemplate

T = TypeVar("T")


class Runtime(NativeBackend):
    def __init__(self, engine: Any = None, **engine_options: Any):
        if engine is None:
            from asgl.engine.loop.engine import Engine

            engine = Engine(**engine_options)
            event_loop.call_sync(engine.start())
            self._owns_engine = True
            event_loop.close_at_exit(self)
        elif engine_options:
            raise TypeError("give either a started engine or engine options, not both")
        else:
            self._owns_engine = False
        self.engine = engine
        task = getattr(engine, "_loop_task", None)  # the engine's step loop runs on its loop
        self._loop = task.get_loop() if task is not None else event_loop.loop()

    def __repr__(self) -> str:
        return f"Runtime({getattr(self.engine.source, 'name', 'engine')!r})"

    @property
    def model_name(self) -> str:
        return getattr(self.engine.source, "name", "") or "model"

    async def _on_engine(self, coro: Awaitable[T]) -> T:
        if asyncio.get_running_loop() is self._loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def chat_template(self) -> ChatTemplate:
        tokenizer = self.engine.tokenizer
        template = self.engine.chat_template
        if tokenizer is None or not (template or tokenizer.chat_template):
            return PlainChatTemplate()
        return JinjaChatTemplate.from_tokenizer(tokenizer, template)

    def _check_images(self, images: list) -> None:
        if images:
            raise NotImplementedError(
                f"image inputs need a vision model; {self.model_name} (in-process Runtime) "
                f"takes text only")

    async def _count_tokens(self, text: str) -> int:
        return len(self.engine.tokenize(text))

    async def _call(self, texts: list[str], sampling: dict, *, images: list = (),
                    logprob_start_len: Optional[int] = None) -> list[NativeOutput]:
        self._check_images(list(images))
        opts = {}
        if logprob_start_len is not None:
            opts = dict(return_logprob=True, logprob_start_len=logprob_start_len)
        outs = await asyncio.gather(*(self._on_engine(self.engine.generate(t, sampling, **opts))
                                      for t in texts))
        return [NativeOutput(o.text, _meta(o), list(o.input_token_logprobs or []))
                for o in outs]

    async def _stream(self, text: str, sampling: dict, *, images: list = ()
                      ) -> AsyncIterator[StreamEvent]:
        self._check_images(list(images))
        if asyncio.get_running_loop() is not self._loop:
            # another loop's engine: stream it as one piece rather than bridge a generator
            out = (await self._call([text], sampling))[0]
            yield StreamEvent(out.text, out.meta)
            return
        meta: dict = {"completion_tokens": 0}
        async for chunk in self.engine.generate_stream(text, sampling):
            for key in ("prompt_tokens", "cached_tokens"):
                if getattr(chunk, key) is not None:
                    meta[key] = getattr(chunk, key)
            meta["completion_tokens"] += len(chunk.token_ids)
            if chunk.finished:
                meta["finish_reason"] = chunk.finish_reason
            yield StreamEvent(chunk.text, dict(meta) if chunk.finished else None)

    def shutdown(self) -> None:
        """Stop the engine this Runtime started (an engine given to it is left running)."""
        event_loop.call_sync(self.aclose())

    async def aclose(self) -> None:
        if self._owns_engine:
            await self._on_engine(self.engine.shutdown())


def _meta(out: Any) -> dict:
    return {"id": out.rid, "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens, "cached_tokens": out.cached_tokens,
            "finish_reason": out.finish_reason}
