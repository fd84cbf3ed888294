"""LLM: a thin synchronous wrapper around Engine for scripts and notebooks.

It runs an Engine on its own event loop in a background thread, so it also works when
the caller already runs a loop (a notebook).

    llm = LLM()                                   # embedded SmolLM2
    outs = llm.generate(["Hi", "Hello"], {"temperature": 0, "max_new_tokens": 8})
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional, Union

from asgl.config import EngineConfig
from asgl.engine.loop.engine import Engine
from asgl.engine.contracts.outputs import GenerateOutput
from asgl.engine.contracts.sampling_params import SamplingParams


class LLM:
    def __init__(self, config: Optional[EngineConfig] = None, **options: Any):
        self.engine = Engine(config, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="asgl-loop",
                                        daemon=True)
        self._thread.start()
        self._call(self.engine.start())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompts: Union[str, list[str], list[list[int]]],
                 sampling_params: Union[SamplingParams, dict, None] = None,
                 **kwargs: Any) -> Union[GenerateOutput, list]:
        """One prompt gives one output; a list gives a list, run as one concurrent batch."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int))

        async def run():
            if single:
                return await self.engine.generate(prompts, sampling_params, **kwargs)
            return list(await asyncio.gather(
                *(self.engine.generate(p, sampling_params, **kwargs) for p in prompts)))
        return self._call(run())

    def embed(self, inputs: Any, **kwargs: Any):
        """Embeddings (an engine started with is_embedding=True); see Engine.embed."""
        return self._call(self.engine.embed(inputs, **kwargs))

    def shutdown(self) -> None:
        if self._loop.is_running():
            self._call(self.engine.shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
