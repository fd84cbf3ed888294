"""What /v1/completions and /v1/chat/completions share: OpenAI fields to SamplingParams,
finish reasons, usage, logprob tables, ids; and GET /v1/models."""

from __future__ import annotations

import time
import uuid
from typing import Optional

import msgspec
from aiohttp import web

from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.server import limits
from asgl.server.errors import ApiError, bad_request
from asgl.server.generation import Generation
from asgl.server.jsonio import json_response
from asgl.server.protocol import (ChoiceLogprobs, CompletionLogprobs, ModelCard, ModelList,
                                  PromptTokensDetails, TokenLogprob, TopLogprob, Usage,
                                  _SamplingFields)
from asgl.server.state import ServerState, get_state
from asgl.server.structural_tag import structural_tag_of
from asgl.server.tokens import TokenTexts

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def new_id(prefix: str) -> tuple[str, str]:
    """(OpenAI id, engine rid): the same hex, so /abort_request works with either."""
    rid = uuid.uuid4().hex
    return f"{prefix}-{rid}", rid


def now() -> int:
    return int(time.time())


def response_model(state: ServerState, requested: Optional[str]) -> str:
    # Any model name is accepted (SGLang's README uses "default"); responses echo it.
    return requested or state.model_name


def finish_reason(reason: Optional[dict]) -> Optional[str]:
    return None if reason is None else _FINISH.get(reason.get("type"), "stop")


def check_stream_options(req: _SamplingFields) -> bool:
    """Whether the stream ends with a usage chunk."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def sampling_params(state: ServerState, req: _SamplingFields, max_tokens: Optional[int],
                    max_tokens_param: str, explicit_max: bool = True) -> SamplingParams:
    """OpenAI fields (with OpenAI's defaults) and the SGLang/vLLM extensions; `explicit_max`:
    whether `max_tokens` is the client's (else a default, which the engine caps)."""
    if max_tokens is not None and max_tokens < 0:
        raise bad_request(f"{max_tokens_param} must be >= 0, got {max_tokens}", max_tokens_param)
    tag = structural_tag_of(req.response_format)  # structural_tag.py
    if tag is not None:
        req = msgspec.structs.replace(req, response_format=None)
    schema, schema_param = _json_schema(state, req)
    sp = SamplingParams(
        max_new_tokens=max_tokens,
        min_new_tokens=_default(req.min_tokens, 0),
        temperature=_default(req.temperature, 1.0),
        top_p=_default(req.top_p, 1.0),
        top_k=_default(req.top_k, -1),
        min_p=_default(req.min_p, 0.0),
        repetition_penalty=_default(req.repetition_penalty, 1.0),
        frequency_penalty=_default(req.frequency_penalty, 0.0),
        presence_penalty=_default(req.presence_penalty, 0.0),
        stop=req.stop if req.stop else None,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=_default(req.ignore_eos, False),
        skip_special_tokens=_default(req.skip_special_tokens, True),
        spaces_between_special_tokens=_default(req.spaces_between_special_tokens, True),
        no_stop_trim=_default(req.no_stop_trim, False),
        n=_default(req.n, 1),
        seed=req.seed,
        logit_bias=req.logit_bias or None,
        regex=req.regex,
        ebnf=req.ebnf,
        json_schema=schema,
        stop_regex=req.stop_regex or None,
        cache_salt=req.cache_salt,
        structural_tag=tag,
    )
    return limits.check_sampling(state, sp, max_tokens_param=max_tokens_param
                                 if explicit_max else None, schema_param=schema_param)


def _json_schema(state: ServerState, req: _SamplingFields) -> tuple[Optional[str], str]:
    """The JSON schema (text) that `response_format` or the `json_schema` extension asks
    for, or None; and the field it came from. `limits.check_sampling` checks it."""
    fmt, schema = req.response_format, None
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise bad_request("response_format.json_schema must be an object "
                                  "{\"name\": ..., \"schema\": {...}}", "response_format")
            schema = spec.get("schema", {"type": "object"})
            if not isinstance(schema, (dict, bool)):
                raise bad_request("response_format.json_schema.schema must be a JSON schema "
                                  "object", "response_format")
        elif kind != "text":
            raise bad_request(f"response_format type {kind!r} is not supported (use 'text', "
                              f"'json_object', 'json_schema' or 'structural_tag')",
                              "response_format")
    param = "response_format"
    if req.json_schema is not None:
        if schema is not None:
            raise bad_request("give response_format or json_schema, not both", "json_schema")
        schema, param = req.json_schema, "json_schema"
    if schema is None:
        return None, param
    if isinstance(schema, str):
        return schema, param
    # msgspec's encoder is C (a 30 MB schema in ~0.1 s), so the size limit applies before
    # any Python walks the schema; its depth (the request body's, already bounded) is safe
    text = msgspec.json.encode(schema).decode()
    limits.check_schema_bytes(state, len(text.encode()), param, "json_schema")
    return text, param


def _default(value, default):
    return default if value is None else value


def usage(gens: list[Generation]) -> Usage:
    """Prompt tokens count once per prompt (not once per choice), like OpenAI."""
    prompt = sum(len(g.job.input_ids) for g in gens)
    completion = sum(g.completion_tokens for g in gens)
    cached = sum(g.choices[0].cached_tokens for g in gens)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


# --------------------------------------------------------------------------- logprobs


def completion_logprobs(texts: TokenTexts, pairs: list, tops: Optional[list],
                        offset: int) -> tuple[CompletionLogprobs, int]:
    """The legacy completions table for (logprob, id) `pairs` and their top alternatives;
    text offsets start at `offset`. Returns the table and the offset after it.

    Each top dict holds the sampled token too, as OpenAI's does (up to logprobs + 1)."""
    tokens, token_lps, top_lps, offsets = [], [], [], []
    for i, (lp, tid) in enumerate(pairs):
        tok = texts.text(tid)
        tokens.append(tok)
        token_lps.append(lp)
        offsets.append(offset)
        offset += len(tok)
        if lp is None:  # the first prompt token has no logprob
            top_lps.append(None)
            continue
        row = tops[i] if tops is not None and i < len(tops) else None
        table = {texts.text(t): v for v, t in row} if row else {}
        table.setdefault(tok, lp)
        top_lps.append(table)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=top_lps,
                              text_offset=offsets), offset


def chat_logprobs(texts: TokenTexts, pairs: list, tops: list, top_n: int) -> ChoiceLogprobs:
    content = []
    for i, (lp, tid) in enumerate(pairs):
        tok = texts.text(tid)
        row = tops[i] if top_n and i < len(tops) and tops[i] else ()
        alts = [TopLogprob(token=(t_text := texts.text(t)), logprob=v,
                           bytes=list(t_text.encode("utf-8"))) for v, t in row[:top_n]]
        content.append(TokenLogprob(token=tok, logprob=lp, bytes=list(tok.encode("utf-8")),
                                    top_logprobs=alts))
    return ChoiceLogprobs(content=content)


# --------------------------------------------------------------------------- /v1/models


def _card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.model_name, created=int(state.started_at),
                     root=state.config.model_path or state.model_name,
                     max_model_len=state.context_len)


async def list_models(request: web.Request) -> web.Response:
    return json_response(ModelList(data=[_card(get_state(request))]))


async def retrieve_model(request: web.Request) -> web.Response:
    state = get_state(request)
    name = request.match_info["model"]
    if name != state.model_name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                       f"{state.model_name!r}", "model", code="model_not_found")
    return json_response(_card(state))
