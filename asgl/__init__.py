"""asgl: a fast asyncio-native serving engine for LLMs, with a language for LLM programs."""

from asgl.config import EngineConfig
from asgl.engine.loop.engine import Engine
from asgl.engine.contracts.outputs import GenerateOutput, StreamChunk
from asgl.engine.contracts.errors import InvalidRequest
from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.engine.loop.sync_engine import LLM
from asgl.lang import (Anthropic, BackendError, OpenAI, Runtime, RuntimeEndpoint, assistant,
                       assistant_begin, assistant_end, fork, function, gen, image, select,
                       set_default_backend, system, system_begin, system_end, user,
                       user_begin, user_end)

__all__ = ["Engine", "EngineConfig", "GenerateOutput", "InvalidRequest", "LLM",
           "SamplingParams", "StreamChunk",
           # the frontend language (asgl.lang)
           "Anthropic", "BackendError", "OpenAI", "Runtime", "RuntimeEndpoint", "assistant",
           "assistant_begin", "assistant_end", "fork", "function", "gen", "image", "select",
           "set_default_backend", "system", "system_begin", "system_end", "user",
           "user_begin", "user_end"]
__version__ = "0.1.0"
