"""What every handler needs, kept on the aiohttp app under one typed key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from asgl.config import EngineConfig
from asgl.server.metrics import Metrics
from asgl.server.tokens import TokenTexts


PROMPT_CHARS_PER_TOKEN = 16


@dataclass
class ServerState:
    engine: Any  # asgl.Engine, or anything with its API (tests use fakes)
    config: EngineConfig
    metrics: Metrics
    model_name: str  # what /v1/models reports
    token_texts: TokenTexts
    started_at: float = field(default_factory=time.time)
    draining: bool = False  # set on SIGTERM: new requests get 503 while in-flight ones finish

    @property
    def max_body_bytes(self) -> int:
        return int(self.config.max_request_body_mb * (1 << 20))

    @property
    def max_prompt_chars(self) -> int:
        """--max-prompt-chars, or 16 characters per token of context: English runs about 4,
        so a prompt this long cannot fit, and tokenizing it is bounded (about 50 ms for a
        context of 8192 tokens)."""
        return self.config.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * self.context_len

    @property
    def context_len(self) -> int:
        return self.engine.context_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size


STATE = web.AppKey("asgl_state", ServerState)


def get_state(request: web.Request) -> ServerState:
    return request.app[STATE]
