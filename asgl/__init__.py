"""asgl: a fast asyncio-native serving engine for LLMs, with a language for LLM programs.

Every name is loaded on first use (module `__getattr__`): `import asgl` and the frontend
(`asgl.lang`, its clients, `RuntimeEndpoint`) must not import torch or transformers, so a
client install (`pip install "asgl[frontend]"`) works without them and `asgl --help` is quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY: dict[str, str] = {
    "EngineConfig": "asgl.config",
    "Engine": "asgl.engine.loop.engine",
    "LLM": "asgl.engine.loop.sync_engine",
    "GenerateOutput": "asgl.engine.contracts.outputs",
    "StreamChunk": "asgl.engine.contracts.outputs",
    "InvalidRequest": "asgl.engine.contracts.errors",
    "SamplingParams": "asgl.engine.contracts.sampling_params",
}
_LANG = ["Anthropic", "BackendError", "OpenAI", "Runtime", "RuntimeEndpoint", "assistant",
         "assistant_begin", "assistant_end", "flush_cache", "fork", "function", "gen",
         "gen_int", "gen_string", "get_server_info", "global_config",
         "greedy_token_selection", "image", "select", "set_default_backend", "system",
         "system_begin", "system_end", "token_length_normalized",
         "unconditional_likelihood_normalized", "user", "user_begin", "user_end"]
_LANG += ["LiteLLM", "VertexAI"]
_LAZY.update({name: "asgl.lang" for name in _LANG})

__all__ = ["Engine", "EngineConfig", "GenerateOutput", "InvalidRequest", "LLM",
           "SamplingParams", "StreamChunk", *_LANG]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asgl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from asgl.config import EngineConfig
    from asgl.engine.contracts.errors import InvalidRequest
    from asgl.engine.contracts.outputs import GenerateOutput, StreamChunk
    from asgl.engine.contracts.sampling_params import SamplingParams
    from asgl.engine.loop.engine import Engine
    from asgl.engine.loop.sync_engine import LLM
    from asgl.lang import (Anthropic, BackendError, OpenAI, Runtime, RuntimeEndpoint,
                           assistant, assistant_begin, assistant_end, flush_cache, fork,
                           function, gen, gen_int, gen_string, get_server_info,
                           global_config, greedy_token_selection, image, select,
                           set_default_backend, system, system_begin, system_end,
                           token_length_normalized, unconditional_likelihood_normalized,
                           user, user_begin, user_end)
    from asgl.lang import LiteLLM, VertexAI
