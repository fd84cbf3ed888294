"""POST /tokenize and /detokenize (and their /v1/ aliases), as vLLM and SGLang serve them.

/tokenize takes a `prompt` (a text, or with SGLang a list of texts) or chat `messages`
(rendered through the chat template first, as /v1/chat/completions would render them) and
answers `{"count", "max_model_len", "tokens", "token_strs"}` (vLLM's shape; SGLang's is
the same without token_strs). `add_special_tokens` defaults to true for a prompt and false
for messages, whose template writes its own special tokens (vLLM's defaults).
/detokenize takes `tokens` and answers `{"prompt": text}` (vLLM) with `text` beside it
(SGLang's key).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec
from aiohttp import web

from asgl.server import compat
from asgl.server.errors import bad_request
from asgl.server.jsonio import json_response, read_json
from asgl.server.limits import check_prompt_chars
from asgl.server.prompts import (check_template_kwargs, messages_to_dicts, render_chat,
                                 template_text)
from asgl.server.protocol import ChatMessage
from asgl.server.state import ServerState, get_state
from asgl.server.tool_calls import ToolSetup, get_format, with_tool_prompt

_REQ = dict(forbid_unknown_fields=True, kw_only=True)


class TokenizeRequest(msgspec.Struct, **_REQ):
    model: Optional[str] = None
    prompt: Union[str, list[str], None] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    return_token_strs: Optional[bool] = None


class DetokenizeRequest(msgspec.Struct, **_REQ):
    tokens: list[int]
    model: Optional[str] = None
    skip_special_tokens: bool = False  # vLLM decodes them: a round trip gives the prompt


def _tokenizer(state: ServerState) -> Any:
    tokenizer = state.engine.tokenizer
    if tokenizer is None:
        raise bad_request("the server runs without a tokenizer (--skip-tokenizer-init)",
                          "prompt")
    return tokenizer


async def tokenize(request: web.Request) -> web.Response:
    state = get_state(request)
    req = await read_json(request, TokenizeRequest)
    tokenizer = _tokenizer(state)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give either prompt or messages", "prompt")
    if req.messages is not None:
        text = await _render(state, req, compat.message_extras(await request.read()))
        special = bool(req.add_special_tokens)
    else:
        if req.add_generation_prompt is not None or req.continue_final_message is not None \
                or req.chat_template_kwargs is not None or req.tools is not None:
            raise bad_request("add_generation_prompt, continue_final_message, "
                              "chat_template_kwargs and tools go with messages", "prompt")
        text = req.prompt
        special = req.add_special_tokens is not False
    for t in text if isinstance(text, list) else [text]:  # bounded like any prompt
        check_prompt_chars(state, len(t), "prompt")
    if isinstance(text, list):  # SGLang: a batch of prompts
        tokens = [tokenizer.encode(t, add_special_tokens=special) for t in text]
        count: Any = [len(t) for t in tokens]
        strs = [_strs(tokenizer, t) for t in tokens] if req.return_token_strs else None
    else:
        tokens = tokenizer.encode(text, add_special_tokens=special)
        count = len(tokens)
        strs = _strs(tokenizer, tokens) if req.return_token_strs else None
    return json_response({"count": count, "max_model_len": state.context_len,
                          "tokens": tokens, "token_strs": strs})


def _strs(tokenizer: Any, ids: list[int]) -> list[str]:
    return list(tokenizer.convert_ids_to_tokens(ids))


async def _render(state: ServerState, req: TokenizeRequest, extras: list[dict]) -> str:
    """The chat prompt that /v1/chat/completions renders for the same messages and tools."""
    messages = messages_to_dicts(req.messages, extras=extras)
    tools = ToolSetup.from_request(req.tools, None, None, config=state.config)
    fmt = get_format(state.config.tool_call_parser)
    messages, template_tools = with_tool_prompt(messages, tools, fmt, template_text(state))
    add_gen, cont = compat.continue_final(messages, req.continue_final_message,
                                          req.add_generation_prompt)
    return await render_chat(state, messages, add_gen, template_tools, cont,
                             check_template_kwargs(req.chat_template_kwargs))


async def detokenize(request: web.Request) -> web.Response:
    state = get_state(request)
    req = await read_json(request, DetokenizeRequest)
    tokenizer = _tokenizer(state)
    vocab = state.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"tokens {bad[:10]} are outside the vocabulary of {vocab}", "tokens")
    text = tokenizer.decode(req.tokens, skip_special_tokens=req.skip_special_tokens)
    return json_response({"prompt": text, "text": text})


def add_routes(app: web.Application) -> None:
    for prefix in ("", "/v1"):
        app.router.add_post(f"{prefix}/tokenize", tokenize)
        app.router.add_post(f"{prefix}/detokenize", detokenize)
