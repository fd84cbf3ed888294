"""asgl.lang: a language for LLM programs (SGLang's frontend, asyncio-native).

Programs are functions of a state: `s += text`, `s += gen(...)` (or `await s.gen(...)` in
`async def` programs), `select`, `fork`, `image`, and chat roles. See api.py.
"""

from asgl.lang.api import (Program, assistant, assistant_begin, assistant_end, flush_cache,
                           fork, function, gen, gen_int, gen_string, get_default_backend,
                           get_server_info, image, select, set_default_backend, system,
                           system_begin, system_end, user, user_begin, user_end)
from asgl.lang.backends import (Anthropic, Backend, BackendError, OpenAI, Runtime,
                                RuntimeEndpoint)
from asgl.lang.backends import LiteLLM, VertexAI
from asgl.lang.choices import (greedy_token_selection, token_length_normalized,
                               unconditional_likelihood_normalized)
from asgl.lang.executor import ProgramError
from asgl.lang.global_config import global_config
from asgl.lang.state import ForkGroup, ProgramState

__all__ = ["Anthropic", "Backend", "BackendError", "ForkGroup", "OpenAI", "Program",
           "ProgramError", "ProgramState", "Runtime", "RuntimeEndpoint", "assistant",
           "assistant_begin", "assistant_end", "flush_cache", "fork", "function", "gen", "gen_int", "get_server_info",
           "gen_string", "get_default_backend", "global_config", "greedy_token_selection",
           "image", "select", "set_default_backend", "system", "system_begin", "system_end",
           "token_length_normalized", "unconditional_likelihood_normalized", "user",
           "user_begin", "user_end", "LiteLLM", "VertexAI"]
