"""What the engine hands back to callers: final outputs, stream chunks (deltas) and the
reason a request finished. Read by the server, the DP front and the loop side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import msgspec


class StreamChunk(msgspec.Struct, omit_defaults=True):
    index: int  # which of the request's n choices
    text: str  # new text since the previous chunk
    token_ids: list[int]  # new token ids
    finished: bool = False
    finish_reason: Optional[dict] = None
    # (logprob, token_id) per new token, and its top alternatives [(logprob, token_id), ...]
    logprobs: Optional[list] = None
    top_logprobs: Optional[list] = None
    # Facts of the request, on each choice's first chunk (and again on its last one):
    # prompt length, prompt tokens served by the prefix cache, seconds spent queued.
    prompt_tokens: Optional[int] = None
    cached_tokens: Optional[int] = None
    queue_time: Optional[float] = None
    # Prompt logprobs (when asked for), on each choice's last chunk.
    input_token_logprobs: Optional[list] = None
    input_top_logprobs: Optional[list] = None


class GenerateOutput(msgspec.Struct, omit_defaults=True):
    rid: str
    index: int
    text: str
    output_ids: list[int]
    finish_reason: Optional[dict]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    output_token_logprobs: Optional[list] = None
    output_top_logprobs: Optional[list] = None
    input_token_logprobs: Optional[list] = None
    input_top_logprobs: Optional[list] = None


@dataclass
class FinishReason:
    kind: str  # "stop" | "length" | "abort"
    matched: Any = None  # the stop token id or stop string that ended it
    message: str = ""

    def to_json(self) -> dict:
        out: dict = {"type": self.kind}
        if self.matched is not None:
            out["matched"] = self.matched
        if self.message:
            out["message"] = self.message
        return out
