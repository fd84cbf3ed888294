"""What every backend implements, and the `select` fallback for backends that cannot score.

A backend is called only from the interpreter's event loop (see event_loop.py), so its
HTTP sessions live on that one loop.

`select` scoring: backends with prompt log-probabilities (the asgl runtime, over HTTP or in
process) score every choice by its token-length-normalized log-probability (native.py).
API backends cannot (OpenAI's chat API and Anthropic's API return no prompt
log-probabilities), so they fall back to generation constrained to the choices: a regex
alternation of the choices where the API takes `regex` (asgl's and SGLang's servers), else a
short greedy generation matched to the closest choice (`closest_choice`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from asgl.lang.chat import ChatTemplate, PlainChatTemplate
from asgl.lang.images import ImageData


class BackendError(RuntimeError):
    """A backend refused or failed a request; `status` is the HTTP status when there is one."""

    def __init__(self, message: str, status: Optional[int] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class Prompt:
    """A state as a backend sees it: the text (roles rendered with the backend's template)
    and the same conversation as messages, for APIs that take messages."""
    text: str
    messages: list[dict]  # finished turns: {"role", "content": str | OpenAI content parts}
    open_role: Optional[str] = None  # the role being written, if any
    open_content: Any = ""  # its content so far (str or parts)
    images: list[ImageData] = field(default_factory=list)

    @property
    def has_roles(self) -> bool:
        return bool(self.messages) or self.open_role is not None


@dataclass
class GenResult:
    text: str
    meta: dict  # prompt_tokens, completion_tokens, cached_tokens, finish_reason, ...


@dataclass
class StreamEvent:
    text: str  # new text
    meta: Optional[dict] = None  # set on the last event


@dataclass
class SelectResult:
    choice: str
    meta: dict  # method, and normalized_logprobs where choices were scored


class Backend:
    # For select's fallback: None until tried, then what the API showed (see below).
    supports_regex: Optional[bool] = None

    async def chat_template(self) -> ChatTemplate:
        return PlainChatTemplate()

    async def generate(self, prompt: Prompt, params: dict) -> GenResult:
        raise NotImplementedError

    async def stream(self, prompt: Prompt, params: dict) -> AsyncIterator[StreamEvent]:
        """Text as it is generated; backends without streaming send it all at once."""
        result = await self.generate(prompt, params)
        yield StreamEvent(result.text, result.meta)

    async def select(self, prompt: Prompt, choices: list[str], params: dict) -> SelectResult:
        return await constrained_select(self, prompt, choices, params)

    async def cache_prefix(self, prompt: Prompt) -> Optional[dict]:
        """Have the prefix cached before forked branches run; None where nothing is cached."""
        return None

    async def aclose(self) -> None:
        pass


async def constrained_select(backend: Backend, prompt: Prompt, choices: list[str],
                             params: dict) -> SelectResult:
    longest = max(len(c) for c in choices)
    # A choice of n characters takes at most n tokens; 8 more leave room for leading
    # whitespace or a stray token before it.
    base = {"temperature": params.get("temperature") or 0.0,
            "max_new_tokens": min(longest + 8, 256)}
    if backend.supports_regex is not False:
        regex = "(" + "|".join(re.escape(c) for c in choices) + ")"
        try:
            out = await backend.generate(prompt, {**base, "regex": regex})
        except BackendError as e:
            if not _rejects_regex(e):
                raise
            backend.supports_regex = False
        else:
            backend.supports_regex = True
            return SelectResult(closest_choice(out.text, choices),
                                {"method": "regex", "generated": out.text, **out.meta})
    out = await backend.generate(prompt, base)
    return SelectResult(closest_choice(out.text, choices),
                        {"method": "closest_match", "generated": out.text, **out.meta})


def _rejects_regex(e: BackendError) -> bool:
    return e.status == 400 and (e.param == "regex" or "regex" in str(e).lower())


def closest_choice(text: str, choices: list[str]) -> str:
    """The choice `text` spells: the longest one it starts with, else the first one it
    contains, else the most similar one."""
    said = text.strip().lower()
    starts = [c for c in choices if said.startswith(c.strip().lower())]
    if starts:
        return max(starts, key=len)
    found = [(said.find(c.strip().lower()), c) for c in choices if c.strip().lower() in said]
    if found:
        return min(found, key=lambda x: x[0])[1]
    return max(choices, key=lambda c: difflib.SequenceMatcher(None, said, c.lower()).ratio())
