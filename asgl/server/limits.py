"""Request limits: what one HTTP request may ask of the engine, checked before anything is
queued, each with an error that names the field and the limit (and its server flag, for the
configurable ones: --max-prompt-chars, --max-stop-strings, --max-stop-string-chars,
--max-schema-depth, --max-schema-bytes, --max-regex-chars, --max-tools, and the work
budgets --max-request-tokens, --max-prompt-logprobs; docs/security.md "Limits").

The engine validates sampling values too; these checks add what only the server knows or
what must be refused before a whole batch is submitted (a batch is all or nothing).
"""

from __future__ import annotations

from typing import Any, Optional

import msgspec

from asgl.engine.contracts.errors import InvalidRequest
from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.engine.grammar.specs import normalize_json_schema, parse_json_schema
from asgl.server.errors import ApiError, bad_request
from asgl.server.generation import Job
from asgl.server.protocol import MAX_N, MAX_TOP_LOGPROBS
from asgl.server.state import PROMPT_CHARS_PER_TOKEN, ServerState

# MAX_N (choices per prompt) and MAX_TOP_LOGPROBS live with the request structs, whose
# decoding enforces them too.
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


def check_sampling(state: ServerState, sp: SamplingParams, n_param: str = "n", *,
                   max_tokens_param: Optional[str] = None, schema_param: str = "json_schema",
                   user_grammar: bool = True) -> SamplingParams:
    """Validate `sp` for this engine; returns it, possibly normalized (never changed in
    meaning: top_k beyond the vocabulary is the same as no top_k).

    `max_tokens_param` names the client's max-tokens field when the client gave it (None:
    our default, which the engine caps to the context); `schema_param` the field the JSON
    schema came from; `user_grammar` is False for grammars the server built itself (tool
    calls), whose parts were checked already."""
    if sp.n > MAX_N:
        raise bad_request(f"n must be <= {MAX_N}, got {sp.n}", n_param)
    context = state.context_len
    if max_tokens_param is not None and sp.max_new_tokens is not None \
            and sp.max_new_tokens > context:
        raise bad_request(f"{max_tokens_param} must be at most the context length, {context} "
                          f"tokens (prompt + output); got {sp.max_new_tokens}", max_tokens_param)
    if sp.min_new_tokens > context:
        raise bad_request(f"min_tokens must be <= the context length {context}, "
                          f"got {sp.min_new_tokens}", "min_tokens")
    check_stops(state, sp.stop_strings)
    constraint = next((name for name in ("regex", "json_schema", "ebnf", "structural_tag")
                       if getattr(sp, name) is not None), None)
    if constraint and not getattr(state.engine, "supports_grammar", False):
        # no grammar layer (--grammar-backend none): refuse rather than ignore the constraint
        raise bad_request(f"constrained decoding ({constraint}) is off on this server "
                          f"(--grammar-backend none)", constraint)
    if constraint and user_grammar:
        check_grammar(state, constraint, getattr(sp, constraint),
                      schema_param if constraint == "json_schema" else constraint)
    if sp.top_k >= state.vocab_size:
        sp = msgspec.structs.replace(sp, top_k=-1)
    sp.validate(state.vocab_size)
    return sp


def check_stops(state: ServerState, stops: list) -> None:
    """Stop strings within --max-stop-strings and --max-stop-string-chars: the detokenizer
    checks every one after each token, holding each one's prefixes."""
    cfg = state.config
    if len(stops) > cfg.max_stop_strings:
        raise bad_request(f"{len(stops)} stop strings; the limit is {cfg.max_stop_strings} "
                          f"(--max-stop-strings)", "stop")
    longest = max((len(s) for s in stops if isinstance(s, str)), default=0)
    if longest > cfg.max_stop_string_chars:
        raise bad_request(f"a stop string has {longest} characters; the limit is "
                          f"{cfg.max_stop_string_chars} (--max-stop-string-chars)", "stop")


def check_grammar(state: ServerState, kind: str, spec: Any, param: str) -> None:
    """A client's constraint within the limits, before the engine compiles it: regexes by
    --max-regex-chars; schemas, EBNF grammars and structural tags by --max-schema-bytes; a
    JSON schema also by --max-schema-depth and for a finite instance."""
    cfg = state.config
    if not isinstance(spec, str):
        raise bad_request(f"{kind} must be a string", param)
    if kind == "regex":
        if len(spec) > cfg.max_regex_chars:
            raise bad_request(f"the regex has {len(spec)} characters; the limit is "
                              f"{cfg.max_regex_chars} (--max-regex-chars)", param)
        return
    check_schema_bytes(state, len(spec.encode("utf-8", "surrogatepass")), param,
                       "json_schema" if kind == "json_schema" else kind)
    if kind == "json_schema":
        try:
            normalize_json_schema(parse_json_schema(spec), param, cfg.max_schema_depth)
        except InvalidRequest as e:
            raise bad_request(str(e), param) from None


def check_schema_bytes(state: ServerState, size: int, param: str, what: str) -> None:
    limit = state.config.max_schema_bytes
    if size > limit:
        raise bad_request(f"the {what} has {size} bytes; the limit is {limit} "
                          f"(--max-schema-bytes)", param)


def check_prompt_chars(state: ServerState, chars: int, param: str) -> None:
    """A text prompt's size, checked before tokenizing (which costs time and memory in
    proportion: 30 MB of text is ~30 s and gigabytes of token ids)."""
    limit = state.max_prompt_chars
    if chars > limit:
        how = "--max-prompt-chars" if state.config.max_prompt_chars else \
            f"--max-prompt-chars; by default {PROMPT_CHARS_PER_TOKEN} x the context length"
        raise bad_request(f"the prompt has {chars} characters; the limit is {limit} ({how})",
                          param)


def check_ids_length(state: ServerState, count: int, param: str) -> None:
    """A token-id prompt's length, before anything looks at the ids themselves."""
    context = state.context_len
    if count >= context:
        raise bad_request(f"the prompt has {count} tokens, but the context length is "
                          f"{context} tokens (prompt + output)", param)


def max_tokens_hint(state: ServerState, field: str) -> str:
    return (f"; {field} must be an integer in [0, {state.context_len}] (the context length, "
            f"prompt + output)")


def check_prompt(state: ServerState, ids: list[int], max_new_tokens: Optional[int],
                 max_tokens_param: Optional[str], prompt_param: str) -> None:
    """The prompt fits the vocabulary and the context, with room for the output when the
    client asked for a number of tokens (`max_tokens_param` names that field; None when the
    number is our default, which is capped to the context instead)."""
    if not ids:
        raise bad_request("the prompt is empty", prompt_param)
    check_ids_length(state, len(ids), prompt_param)  # before a scan of every id
    vocab = state.vocab_size
    for t in ids:
        if type(t) is not int or not 0 <= t < vocab:
            raise bad_request(f"token id {t!r} is outside the vocabulary of {vocab} tokens",
                              prompt_param)
    context = state.context_len
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


def check_work(state: ServerState, jobs: list[Job], max_tokens_param: str = "max_tokens",
               logprobs_param: str = "logprobs") -> None:
    """A request's work within its budgets, once its prompts are tokenized: the tokens its
    sequences may generate (n x max_tokens over its prompts, an absent max_tokens counting
    as the context left; only for more than one sequence, one is bounded by the context)
    within --max-request-tokens, and the prompt positions it wants logprobs for within
    --max-prompt-logprobs."""
    context = state.context_len
    sequences = tokens = positions = 0
    for job in jobs:
        n, room = job.params.n, context - len(job.input_ids)
        sequences += n
        asked = job.params.max_new_tokens
        tokens += n * (room if asked is None else min(asked, room))
        if job.return_logprob and job.logprob_start_len >= 0:
            positions += n * (len(job.input_ids) - job.logprob_start_len)
    limit = state.max_request_tokens
    if sequences > 1 and tokens > limit:
        raise bad_request(f"this request may generate {tokens} tokens over {sequences} "
                          f"sequences (n x {max_tokens_param}, an absent {max_tokens_param} "
                          f"counting as the context left); the limit is {limit} "
                          f"(--max-request-tokens): lower n or {max_tokens_param}", "n")
    limit = state.max_prompt_logprobs
    if positions > limit:
        raise bad_request(f"this request asks for logprobs of {positions} prompt positions "
                          f"(over its prompts and n); the limit is {limit} "
                          f"(--max-prompt-logprobs)", logprobs_param)
