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
# Default work budgets per request (--max-request-tokens, --max-prompt-logprobs).
CPU_REQUEST_TOKENS, GPU_REQUEST_TOKENS = 4096, 262144
CPU_PROMPT_LOGPROBS, GPU_PROMPT_LOGPROBS = 1024, 65536


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
    def on_cpu(self) -> bool:
        """Whether the engine computes on the CPU (where the work budgets are tighter)."""
        device = getattr(getattr(self.engine, "runner", None), "device", None)
        if device is not None:
            return getattr(device, "type", device) == "cpu"
        return self.config.device == "cpu"

    @property
    def max_request_tokens(self) -> int:
        """--max-request-tokens, else by device: on a 2-core CPU with the embedded model
        n=128 x 64 tokens (8,192) ran for minutes; a GPU runs such a request in seconds."""
        return self.config.max_request_tokens or (
            CPU_REQUEST_TOKENS if self.on_cpu else GPU_REQUEST_TOKENS)

    @property
    def max_prompt_logprobs(self) -> int:
        """--max-prompt-logprobs, else by device: each scored prompt position costs a full
        vocabulary of logits (200 KB for a 49k vocabulary) and a log-softmax."""
        return self.config.max_prompt_logprobs or (
            CPU_PROMPT_LOGPROBS if self.on_cpu else GPU_PROMPT_LOGPROBS)

    @property
    def context_len(self) -> int:
        return self.engine.context_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size


STATE = web.AppKey("asgl_state", ServerState)


def get_state(request: web.Request) -> ServerState:
    return request.app[STATE]
