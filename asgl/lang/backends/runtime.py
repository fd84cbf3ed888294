"""Runtime: an `asgl.Engine` in this process, no server in between.

`Runtime()` starts an engine (the embedded SmolLM2 unless `model_path=` says otherwise) on
the interpreter's loop, where programs run; `Runtime(engine=e)` uses an engine you already
started, on whatever loop it runs (calls are handed to that loop).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

from asgl.lang import event_loop
from asgl.lang.backends.base import BackendError, StreamEvent
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

    async def image_token(self) -> Optional[str]:
        images = getattr(self.engine, "images", None)
        return images.placeholder + "\n" if images is not None else None

    def _check_images(self, images: list) -> Optional[list]:
        """The images as the engine takes them (encoded bytes), None without images."""
        if not images:
            return None
        if getattr(self.engine, "images", None) is None:
            raise NotImplementedError(
                f"image inputs need a vision model; {self.model_name} (in-process Runtime) "
                f"takes text only")
        if any(img.data is None for img in images):
            raise BackendError("the in-process Runtime does not fetch image URLs: give "
                               "image() a file, a data URL or bytes")
        return [img.data for img in images]

    async def _count_tokens(self, text: str) -> int:
        return len(self.engine.tokenize(text))

    async def _call(self, texts: list[str], sampling: dict, *, images: list = (),
                    logprob_start_len: Optional[int] = None, return_logprob: bool = False,
                    top_logprobs_num: int = 0, return_text: bool = False,
                    input_ids: Optional[list[list[int]]] = None) -> list[NativeOutput]:
        data = self._check_images(list(images))
        opts: dict[str, Any] = {"image_data": data} if data else {}
        if return_logprob or logprob_start_len is not None:
            opts.update(return_logprob=True, top_logprobs_num=top_logprobs_num,
                        logprob_start_len=-1 if logprob_start_len is None else logprob_start_len)
        prompts = [(t, None) for t in texts] + [(None, ids) for ids in input_ids or []]
        outs = await asyncio.gather(*(self._on_engine(self.engine.generate(
            t, sampling, input_ids=ids, **opts)) for t, ids in prompts))
        entries = _Entries(self.engine.tokenizer if return_text else None)
        return [NativeOutput(o.text, _meta(o), entries.tokens(o.input_token_logprobs or []),
                             entries.meta(o) if opts else {}) for o in outs]

    async def _stream(self, text: str, sampling: dict, *, images: list = (),
                      return_logprob: bool = False, logprob_start_len: Optional[int] = None,
                      top_logprobs_num: int = 0, return_text: bool = False,
                      ) -> AsyncIterator[StreamEvent]:
        data = self._check_images(list(images))
        logprob = dict(return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                       top_logprobs_num=top_logprobs_num, return_text=return_text)
        if asyncio.get_running_loop() is not self._loop:
            # another loop's engine: stream it as one piece rather than bridge a generator
            out = (await self._call([text], sampling, images=images, **logprob))[0]
            yield StreamEvent(out.text, {**out.meta, **out.logprobs})
            return
        opts: dict[str, Any] = {"image_data": data} if data else {}
        if return_logprob:
            opts.update(return_logprob=True, top_logprobs_num=top_logprobs_num,
                        logprob_start_len=-1 if logprob_start_len is None else logprob_start_len)
        entries = _Entries(self.engine.tokenizer if return_text else None)
        meta: dict = {"completion_tokens": 0}
        if return_logprob:
            meta.update(output_token_logprobs=[], input_token_logprobs=[],
                        output_top_logprobs=[] if top_logprobs_num else None,
                        input_top_logprobs=None)
        async for chunk in self.engine.generate_stream(text, sampling, **opts):
            for key in ("prompt_tokens", "cached_tokens"):
                if getattr(chunk, key) is not None:
                    meta[key] = getattr(chunk, key)
            meta["completion_tokens"] += len(chunk.token_ids)
            if return_logprob:  # chunks carry deltas; the meta reports them all
                meta["output_token_logprobs"] += entries.tokens(chunk.logprobs or [])
                if top_logprobs_num:
                    meta["output_top_logprobs"] += entries.tops(chunk.top_logprobs or [])
                if chunk.input_token_logprobs is not None:
                    meta["input_token_logprobs"] = entries.tokens(chunk.input_token_logprobs)
                    if top_logprobs_num:
                        meta["input_top_logprobs"] = entries.tops(chunk.input_top_logprobs
                                                                  or [])
            if chunk.finished:
                meta["finish_reason"] = chunk.finish_reason
            yield StreamEvent(chunk.text, dict(meta) if chunk.finished else None)

    async def flush_cache(self) -> bool:
        return bool(await self._on_engine(_call_async(self.engine.flush_cache)))

    async def get_server_info(self) -> dict:
        return {"model_path": self.model_name,
                "memory_state": await self._on_engine(_call_async(self.engine.memory_state))}

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


class _Entries:
    """Engine (logprob, token_id) pairs as SGLang's [logprob, token_id, text | None]."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer

    def _entry(self, pair: Any) -> list:
        lp, tid = pair[0], pair[1]
        return [lp, tid, self._tokenizer.decode([tid]) if self._tokenizer is not None else None]

    def tokens(self, pairs: list) -> list:
        return [self._entry(p) for p in pairs]

    def tops(self, rows: list) -> list:
        return [None if row is None else self.tokens(row) for row in rows]

    def meta(self, out: Any) -> dict:
        top = out.output_top_logprobs is not None
        return {"output_token_logprobs": self.tokens(out.output_token_logprobs or []),
                "output_top_logprobs": self.tops(out.output_top_logprobs) if top else None,
                "input_token_logprobs": self.tokens(out.input_token_logprobs or []),
                "input_top_logprobs": (self.tops(out.input_top_logprobs)
                                       if out.input_top_logprobs is not None else None)}


async def _call_async(fn: Any) -> Any:
    # engine methods that must run on the engine's loop thread
    return fn()
