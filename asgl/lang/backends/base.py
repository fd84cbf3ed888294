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
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from asgl.lang import ir
from asgl.lang.chat import ChatTemplate, PlainChatTemplate
from asgl.lang.images import ImageData
from asgl.lang.sampling import stop_list


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


class TokenUsage:
    """Tokens this backend was sent and answered with, over every program (SGLang's
    `backend.token_usage`): what API speculative execution saves shows here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, meta: Optional[dict]) -> None:
        meta = meta or {}
        with self._lock:
            self.prompt_tokens += meta.get("prompt_tokens") or 0
            self.completion_tokens += meta.get("completion_tokens") or 0

    def reset(self) -> None:
        with self._lock:
            self.prompt_tokens = self.completion_tokens = 0

    def __repr__(self) -> str:
        return (f"TokenUsage(prompt_tokens={self.prompt_tokens}, "
                f"completion_tokens={self.completion_tokens})")


class Backend:
    # For select's fallback: None until tried, then what the API showed (see below).
    supports_regex: Optional[bool] = None
    # Whether select scores choices by prompt logprobs (so every choices_method works).
    scores_choices = False

    @property
    def token_usage(self) -> TokenUsage:
        usage = self.__dict__.get("_token_usage")
        if usage is None:  # per backend object (subclasses need not call a base __init__)
            usage = self.__dict__["_token_usage"] = TokenUsage()
        return usage

    async def chat_template(self) -> ChatTemplate:
        return PlainChatTemplate()

    async def image_token(self) -> Optional[str]:
        """The text an image stands as in a prompt (a native backend serving a vision
        model: its placeholder); None where images travel as message parts."""
        return None

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

    async def flush_cache(self) -> bool:
        """Drop the runtime's prefix cache (`sgl.flush_cache()`); API backends have none."""
        raise BackendError(f"{self!r} has no prefix cache to flush", param="flush_cache")

    async def get_server_info(self) -> dict:
        raise BackendError(f"{self!r} reports no server info", param="get_server_info")

    async def aclose(self) -> None:
        pass


async def constrained_select(backend: Backend, prompt: Prompt, choices: list[str],
                             params: dict) -> SelectResult:
    method = params.get("choices_method")
    if method is not None and method.name != "token_length_normalized":
        raise BackendError(f"select(choices_method={method.name}) needs the choices' prompt "
                           f"log-probabilities, which {backend!r} does not return: use a "
                           f"runtime backend (RuntimeEndpoint, Runtime)", param="choices_method")
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


# ---------------------------------------------------------------------- typed generation
# gen(dtype=...): SGLang's regex for the type (ir.py), plus the stop strings SGLang adds so
# a number ends at the first space or newline.
DTYPE_REGEX = {"int": ir.REGEX_INT, "float": ir.REGEX_FLOAT, "str": ir.REGEX_STR,
               "bool": ir.REGEX_BOOL}
DTYPE_STOPS = {"int": [" ", "\n"], "float": [" ", "\n"]}
# Where the API takes no regex: the value is parsed out of a free answer instead.
_DTYPE_PARSE = {"int": r"[-+]?[0-9]+", "float": r"[-+]?[0-9]*\.?[0-9]+",
                "bool": r"True|False|true|false", "str": r"\"[\w\d\s]*\""}


async def typed_generate(backend: Backend, prompt: Prompt, params: dict,
                         dtype: str) -> GenResult:
    """gen(dtype=...): constrained by the type's regex where the backend takes one; else
    the answer's first value of that type (a str: its first line, quoted as JSON). No value
    in the answer raises a BackendError naming the dtype."""
    if backend.supports_regex is not False:
        constrained = {**params, "regex": DTYPE_REGEX[dtype],
                       "stop": stop_list(params) + DTYPE_STOPS.get(dtype, [])}
        try:
            out = await backend.generate(prompt, constrained)
        except BackendError as e:
            if not _rejects_regex(e):
                raise
            backend.supports_regex = False
        else:
            backend.supports_regex = True
            return GenResult(out.text, {**out.meta, "dtype_method": "regex"})
    out = await backend.generate(prompt, params)
    found = re.search(_DTYPE_PARSE[dtype], out.text)
    if found is not None:
        value = found.group(0)
        if dtype == "bool":
            value = value.capitalize()
    elif dtype == "str" and out.text.strip():
        value = json.dumps(out.text.strip().splitlines()[0])
    else:
        raise BackendError(f"gen(dtype={dtype}): {backend!r} takes no regex, and its answer "
                           f"{out.text[:80]!r} holds no {dtype}", param="dtype")
    return GenResult(value, {**out.meta, "dtype_method": "post_parse", "generated": out.text})
