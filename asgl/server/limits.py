"""Request limits: what one HTTP request may ask of the engine, checked before anything is
queued, each with an error that names the field.

The engine validates sampling values too; these checks add what only the server knows or
what must be refused before a whole batch is submitted (a batch is all or nothing).
"""

from __future__ import annotations

from typing import Optional

import msgspec

from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.server.errors import ApiError, bad_request
from asgl.server.state import ServerState

MAX_N = 128  # choices per prompt
MAX_TOP_LOGPROBS = 20
MAX_SEQUENCES = 4096  # prompts x n in one HTTP request
RETRY_AFTER_SECONDS = "1"


def check_admission(state: ServerState, new_sequences: int) -> None:
    """503 (with Retry-After) when the server drains or the wait queue is full."""
    if state.draining:
        state.metrics.rejected.labels("draining").inc()
        raise ApiError(503, "the server is shutting down", code="server_shutting_down",
                       headers={"Retry-After": RETRY_AFTER_SECONDS})
    limit = state.config.max_queued_requests
    if limit is None:
        return
    waiting = len(state.engine.scheduler.waiting)
    if waiting + new_sequences > limit:
        state.metrics.rejected.labels("queue_full").inc()
        raise ApiError(503, f"the server is busy: {waiting} sequences are waiting "
                       f"(--max-queued-requests {limit}); retry later", code="queue_full",
                       headers={"Retry-After": RETRY_AFTER_SECONDS})


def check_sequences(total: int) -> None:
    """`total`: sequences one HTTP request asks for (prompts x n)."""
    if total > MAX_SEQUENCES:
        raise bad_request(f"this request would run {total} sequences (prompts x n); "
                          f"the limit is {MAX_SEQUENCES}", "n")


def check_sampling(state: ServerState, sp: SamplingParams, n_param: str = "n") -> SamplingParams:
    """Validate `sp` for this engine; returns it, possibly normalized (never changed in
    meaning: top_k beyond the vocabulary is the same as no top_k)."""
    if sp.n > MAX_N:
        raise bad_request(f"n must be <= {MAX_N}, got {sp.n}", n_param)
    if sp.min_new_tokens > state.context_len:
        raise bad_request(f"min_tokens must be <= the context length {state.context_len}, "
                          f"got {sp.min_new_tokens}", "min_tokens")
    constraint = next((name for name in ("regex", "json_schema", "ebnf", "structural_tag")
                       if getattr(sp, name) is not None), None)
    if constraint and not getattr(state.engine, "supports_grammar", False):
        # no grammar layer (--grammar-backend none): refuse rather than ignore the constraint
        raise bad_request(f"constrained decoding ({constraint}) is off on this server "
                          f"(--grammar-backend none)", constraint)
    if sp.top_k >= state.vocab_size:
        sp = msgspec.structs.replace(sp, top_k=-1)
    if sp.max_new_tokens is not None and sp.max_new_tokens > 1 << 31:
        sp = msgspec.structs.replace(sp, max_new_tokens=None)  # "until the context is full"
    sp.validate(state.vocab_size)
    return sp


def check_prompt(state: ServerState, ids: list[int], max_new_tokens: Optional[int],
                 max_tokens_param: Optional[str], prompt_param: str) -> None:
    """The prompt fits the vocabulary and the context, with room for the output when the
    client asked for a number of tokens (`max_tokens_param` names that field; None when the
    number is our default, which is capped to the context instead)."""
    if not ids:
        raise bad_request("the prompt is empty", prompt_param)
    vocab = state.vocab_size
    for t in ids:
        if type(t) is not int or not 0 <= t < vocab:
            raise bad_request(f"token id {t!r} is outside the vocabulary of {vocab} tokens",
                              prompt_param)
    context = state.context_len
    if len(ids) >= context:
        raise bad_request(f"the prompt has {len(ids)} tokens, but the context length is "
                          f"{context} tokens (prompt + output)", prompt_param)
    if max_tokens_param is not None and max_new_tokens is not None \
            and len(ids) + max_new_tokens > context:
        raise bad_request(f"the context length is {context} tokens, but {len(ids)} prompt "
                          f"tokens + {max_new_tokens} requested output tokens exceed it; "
                          f"ask for at most {context - len(ids)}", max_tokens_param)


def check_logprobs(state: ServerState, top: int, start: int, prompt_len: int,
                   top_param: str = "top_logprobs_num") -> None:
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad_request(f"{top_param} must be in [0, {MAX_TOP_LOGPROBS}], got {top}",
                          top_param)
    if start != -1 and not 0 <= start < prompt_len:
        raise bad_request(f"logprob_start_len must be -1 (no prompt logprobs) or in "
                          f"[0, {prompt_len}) for this prompt, got {start}", "logprob_start_len")
