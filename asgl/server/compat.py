"""Small request and response extensions that SGLang's and vLLM's clients send or read,
shared by the OpenAI routes (docs/compatibility.md lists each with its test):

- `matched_stop` (SGLang): the stop string or token id (EOS included) that ended a choice;
  null when none did (length, abort).
- `stream_options.continuous_usage_stats` (vLLM): with `include_usage`, every chunk carries
  the usage so far, not only the final one.
- extra keys inside chat messages (vLLM passes them to the chat template): read from the
  body, since the message struct keeps only the fields it names.
- `continue_final_message` and chat `echo` (vLLM).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec
from msgspec import UNSET, UnsetType

from asgl.server.errors import bad_request
from asgl.server.protocol import ChatMessage, Usage, _SamplingFields

_MESSAGE_FIELDS = frozenset(f.encode_name for f in msgspec.structs.fields(ChatMessage))


def matched_stop(reason: Optional[dict]) -> Union[int, str, None]:
    return None if reason is None else reason.get("matched")


def continuous_usage(req: _SamplingFields) -> bool:
    """Whether every chunk carries the usage so far (vLLM: needs include_usage too)."""
    opts = req.stream_options
    return bool(req.stream and opts and opts.include_usage and opts.continuous_usage_stats)


def chunk_usage(include_usage: bool, continuous: bool, gens: list) -> Union[Usage, None,
                                                                              UnsetType]:
    """A stream chunk's `usage`: absent without include_usage, null (OpenAI) or the usage
    so far (vLLM's continuous_usage_stats)."""
    if not include_usage:
        return UNSET
    if not continuous:
        return None
    from asgl.server.openai_common import usage
    return usage(gens)


def message_extras(body: bytes) -> list[dict[str, Any]]:
    """Per message, its keys that ChatMessage does not name (vLLM hands them to the chat
    template, e.g. a `thinking` key or a custom field the template reads)."""
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:  # pragma: no cover - the struct decode already passed
        return []
    messages = raw.get("messages") if isinstance(raw, dict) else None
    if not isinstance(messages, list):
        return []
    return [{k: v for k, v in m.items() if k not in _MESSAGE_FIELDS}
            if isinstance(m, dict) else {} for m in messages]


def continue_final(messages: list[dict], continue_final_message: Optional[bool],
                   add_generation_prompt: Optional[bool]) -> tuple[bool, bool]:
    """(add_generation_prompt, continue_final_message) as vLLM checks them: continuing the
    final message needs it to be the assistant's and excludes a new generation prompt."""
    cont = bool(continue_final_message)
    if not cont:
        return (True if add_generation_prompt is None else add_generation_prompt), False
    if add_generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be "
                          "true", "continue_final_message")
    if messages[-1]["role"] != "assistant":
        raise bad_request("continue_final_message needs the last message to be the "
                          "assistant's", "continue_final_message")
    return False, True


def echo_prefix(messages: list[dict], echo: Optional[bool]) -> str:
    """vLLM's chat `echo`: the reply starts with the last message's content when that
    message is the assistant's (the one being continued); else nothing is echoed."""
    if not echo or not messages or messages[-1]["role"] != "assistant":
        return ""
    content = messages[-1].get("content")
    return content if isinstance(content, str) else ""
