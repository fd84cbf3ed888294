"""Prompts to token ids: tokenizing text and rendering chat messages.

The server tokenizes (through the engine's tokenizer) rather than handing text to the
engine, because it must know the prompt length before anything is queued: to refuse
`max_tokens` that overflow the context with a 400, to report usage in streams, and to
validate a whole batch before submitting any of it. Long inputs are tokenized and
rendered in a worker thread (the fast tokenizer releases the GIL) so the event loop keeps
serving.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Optional, TypeVar

from asgl.engine.loop import offload
from asgl.server.errors import ApiError, bad_request
from asgl.server.limits import check_prompt_chars
from asgl.server.state import ServerState

# Below this many characters tokenizing takes well under a millisecond: stay on the loop.
_OFFLOAD_CHARS = 4096

T = TypeVar("T")


async def _maybe_offload(size: int, fn: Callable[..., T], *args: Any) -> T:
    if size <= _OFFLOAD_CHARS:
        return fn(*args)
    try:  # off the loop, in the tokenize pool, with a deadline (engine/loop/offload.py)
        return await offload.run_bounded(fn, *args)
    except asyncio.TimeoutError:
        raise ApiError(503, f"tokenizing the prompt took longer than "
                       f"{offload.TOKENIZE_TIMEOUT_S:.0f} s: the server is overloaded",
                       headers={"Retry-After": "5"}) from None


async def tokenize(state: ServerState, text: str, param: str) -> list[int]:
    if state.engine.tokenizer is None:
        raise bad_request("the server runs without a tokenizer (--skip-tokenizer-init): "
                          "send token ids", param)
    if not text:
        raise bad_request("the prompt is empty", param)
    check_prompt_chars(state, len(text), param)
    return await _maybe_offload(len(text), state.engine.tokenize, text)


async def tokenize_rendered(state: ServerState, text: str) -> list[int]:
    """A rendered chat prompt: it already holds the template's special tokens (BOS too)."""
    check_prompt_chars(state, len(text), "messages")  # the template and tools add to it
    return await _maybe_offload(len(text), _encode_plain, state.engine.tokenizer, text)


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


async def tokenize_all(state: ServerState, texts: list[str], param: str) -> list[list[int]]:
    for t in texts:  # all of them before any is tokenized
        check_prompt_chars(state, len(t), param)
    return list(await asyncio.gather(*(tokenize(state, t, param) for t in texts)))


def messages_to_dicts(messages: list, images: Any = None,
                      extras: Optional[list[dict]] = None) -> list[dict]:
    """ChatMessage structs to the plain dicts chat templates expect, text only; assistant
    tool calls and tool results are kept in OpenAI's shape. With `images` (a
    server/images.py ChatImages: a vision-language model), each image_url part is recorded
    there and stands as the model's image placeholder in the text. A role other than
    OpenAI's, and `extras` (per message, keys the struct does not name), go to the template
    as given, as vLLM does: the template renders them or rejects them (a 400)."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role == "function":
            raise bad_request(f"{where}: the 'function' role is deprecated: use 'tool'",
                              f"{where}.role")
        if m.tool_calls and m.role != "assistant":
            raise bad_request(f"{where}: only assistant messages have tool_calls",
                              f"{where}.tool_calls")
        if not m.role:
            raise bad_request(f"{where}: role must not be empty", f"{where}.role")
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type == "image_url" and images is not None:
                    texts.append(images.add(part.image_url, f"{where}.content[{j}]"))
                    continue
                if part.type == "video_url" and images is not None:
                    texts.append(images.add_video(part.video_url, f"{where}.content[{j}]"))
                    continue
                if part.type != "text" or part.text is None:
                    raise bad_request(f"{where}.content[{j}]: this model takes text only "
                                      f"(got a {part.type!r} part)", f"{where}.content")
                texts.append(part.text)
            content = "\n".join(texts)
        elif content is None:
            if m.role != "assistant":
                raise bad_request(f"{where}: content is required", f"{where}.content")
            content = ""
        msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]")
                                 for j, c in enumerate(m.tool_calls)]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if getattr(m, "reasoning_content", None) is not None:
            msg["reasoning_content"] = m.reasoning_content
        if extras and i < len(extras):
            for key, value in extras[i].items():
                msg.setdefault(key, value)
        out.append(msg)
    if not out:
        raise bad_request("messages must not be empty", "messages")
    return out


def _tool_call(call: Any, where: str) -> dict:
    """An assistant message's past call: {"id", "type", "function": {"name", "arguments"}}."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": "
                          f"{{\"name\", \"arguments\"}}}}", where)
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args)
    return {"id": call.get("id", ""), "type": "function",
            "function": {"name": fn["name"], "arguments": args}}


def template_text(state: ServerState) -> str:
    """The chat template in use, as text (to see whether it renders tools itself)."""
    engine = state.engine
    template = getattr(engine, "chat_template", None) or \
        getattr(engine.tokenizer, "chat_template", None)
    return str(template or "")


def _render(tokenizer: Any, messages: list[dict], template: Optional[str],
            add_generation_prompt: bool, tools: Optional[list[dict]] = None,
            continue_final_message: bool = False, template_kwargs: Optional[dict] = None
            ) -> str:
    from asgl.engine.loop.tokenizer import apply_chat_template
    return apply_chat_template(tokenizer, messages, chat_template=template,
                               add_generation_prompt=add_generation_prompt, tools=tools,
                               continue_final_message=continue_final_message,
                               **(template_kwargs or {}))


# Template variables that chat_template_kwargs may not set: the renderer's own arguments.
_RESERVED_TEMPLATE_VARS = frozenset({"messages", "tools", "add_generation_prompt",
                                     "continue_final_message", "chat_template", "tokenize",
                                     "documents", "return_dict", "conversation"})


def check_template_kwargs(kwargs: Optional[dict], param: str = "chat_template_kwargs") -> dict:
    """chat_template_kwargs as template variables; the renderer's own arguments are refused
    (all of them named) rather than silently overriding the request."""
    if not kwargs:
        return {}
    bad = sorted(set(kwargs) & _RESERVED_TEMPLATE_VARS)
    if bad:
        raise bad_request(f"{param} may not set {', '.join(bad)}: give them as request "
                          f"fields", param)
    return dict(kwargs)


async def render_chat(state: ServerState, messages: list[dict],
                      add_generation_prompt: bool, tools: Optional[list[dict]] = None,
                      continue_final_message: bool = False,
                      template_kwargs: Optional[dict] = None) -> str:
    engine = state.engine
    if engine.tokenizer is None:
        raise bad_request("chat needs a tokenizer; this server runs without one", "messages")
    template = getattr(engine, "chat_template", None) or state.config.chat_template
    size = sum(len(m["content"]) if isinstance(m.get("content"), str) else 0
               for m in messages)
    check_prompt_chars(state, size, "messages")  # before rendering, as before tokenizing
    try:
        return await _maybe_offload(size, _render, engine.tokenizer, messages, template,
                                    add_generation_prompt, tools, continue_final_message,
                                    template_kwargs)
    except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
        if _is_template_error(e):
            raise bad_request(f"the chat template rejected these messages: {e}",
                              "messages") from None
        raise


def _is_template_error(e: Exception) -> bool:
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover
        TemplateError = ()  # type: ignore[assignment]
    return isinstance(e, (TemplateError, ValueError))
