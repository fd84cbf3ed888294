"""Roles as text: what `user(...)` writes before and after its content.

A program writes a role's content piece by piece (text, then a `gen`, ...), so the model's
Jinja chat template cannot render it in one go. Instead each role's opening and closing are
cut out of the template's own rendering of the conversation so far plus one message whose
content is a sentinel: what follows the conversation's text so far up to the sentinel is
the opening, the text after the sentinel the closing. So a state's text is exactly what the
template renders for its messages (defaults the template adds, such as a system prompt
before a first user turn, included), and the assistant opening is the template's
generation prompt, what the model was trained to continue from. A template that renders a
turn only inside the next one (Mistral's system prompt, put in the first [INST]) gets that
turn's opening written early, and the next turn's opening is then empty.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Protocol

logger = logging.getLogger(__name__)

_SENTINEL = "\u2063asgl-content\u2063"  # invisible separators: never in real messages
_NEXT = "\u2063asgl-next\u2063"

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text


class ChatTemplate(Protocol):
    def prefix(self, history: list[dict], rendered: str, role: str) -> str:
        """The opening of a `role` turn after `history`, whose turns were written as
        `rendered`."""


    def suffix(self, history: list[dict], role: str) -> str: ...


class JinjaChatTemplate:
    def __init__(self, render: Render, name: str = "jinja"):
        self._render = render
        self.name = name

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, template: Optional[str] = None) -> "JinjaChatTemplate":
        """Render as asgl's server does (`apply_chat_template`): `template` is a built-in
        name, a file or Jinja text; None uses the tokenizer's own."""
        from asgl.engine.loop.tokenizer import apply_chat_template

        def render(messages: list[dict], add_generation_prompt: bool) -> str:
            return apply_chat_template(tokenizer, messages, chat_template=template,
                                       add_generation_prompt=add_generation_prompt)
        return cls(render, getattr(tokenizer, "name_or_path", "tokenizer"))

    def _safe(self, messages: list[dict], add_generation_prompt: bool = False) -> Optional[str]:
        try:
            return self._render(messages, add_generation_prompt)
        except Exception:  # some templates refuse partial conversations (e.g. no messages)
            return None

    def _around(self, history: list[dict], role: str) -> tuple[str, str]:
        turn = {"role": role, "content": _SENTINEL}
        head, found, tail = self._render(history + [turn], False).partition(_SENTINEL)
        if found:
            return head, tail
        # Not rendered as the last turn: maybe folded into the next one.
        text = self._render(history + [turn, {"role": "user", "content": _NEXT}], False)
        head, found, tail = text.partition(_SENTINEL)
        if found and _NEXT in tail:
            return head, tail.partition(_NEXT)[0]
        raise ValueError(f"the chat template drops the content of {role!r} turns")

    def prefix(self, history: list[dict], rendered: str, role: str) -> str:
        if role == "assistant":
            prompt = self._safe(history, True)
            if prompt is not None and prompt.startswith(rendered) and len(prompt) > len(rendered):
                return prompt[len(rendered):]
        head, _ = self._around(history, role)
        if head.startswith(rendered):
            return head[len(rendered):]
        # The template renders earlier turns differently once more follow (rare): use the
        # opening of this role as the first turn instead.
        logger.debug("chat template re-renders history; using a standalone %s opening", role)
        return self._around([], role)[0]

    def suffix(self, history: list[dict], role: str) -> str:
        return self._around(history, role)[1]


class PlainChatTemplate:
    """For API backends, which take messages, not text: a readable rendering for `text()`."""
    name = "plain"

    def prefix(self, history: list[dict], rendered: str, role: str) -> str:
        return f"{role.upper()}: "

    def suffix(self, history: list[dict], role: str) -> str:
        return "\n"


def text_only(messages: list[dict]) -> list[dict]:
    """Messages with image parts dropped, as text-only chat templates expect them."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        out.append({"role": m["role"], "content": content})
    return out
