"""SGLang's native API: POST /generate (one prompt or a batch, streaming or not), /health,
/health_generate, /get_model_info, /get_server_info, /flush_cache, /abort_request.

Shapes follow SGLang: a response is `{"text", "output_ids", "meta_info"}` (a list of them
for a batch or n > 1); a stream sends the text *so far* in each event (SGLang clients
print `text[len(previous):]`), with `index` on batch streams, and ends with `[DONE]`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Optional

import msgspec
from aiohttp import web

import asgl
from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.engine.contracts.outputs import StreamChunk
from asgl.server import limits
from asgl.server.errors import ApiError, bad_request
from asgl.server.generation import Choice, Generation, Job, deliver_all, run_all
from asgl.server.images import native_images
from asgl.server.jsonio import json_response, read_json
from asgl.server.prompts import tokenize_all
from asgl.server.protocol import AbortRequest, GenerateRequest, GenerateResponse, MetaInfo
from asgl.server.sse import SSEWriter, stream_events
from asgl.server.state import ServerState, get_state

_SAMPLING_FIELDS = frozenset(f.name for f in msgspec.structs.fields(SamplingParams))
_HEALTH_TIMEOUT_S = 20.0


# --------------------------------------------------------------------------- /generate


async def generate(request: web.Request) -> web.StreamResponse:
    arrival = time.monotonic()
    state = get_state(request)
    body = await read_json(request, GenerateRequest)
    jobs, single = await _jobs(state, body)
    limits.check_admission(state, sum(j.params.n for j in jobs))
    gens = [Generation(state, job, arrival) for job in jobs]
    with_text = body.return_text_in_logprobs
    if body.stream:
        # one prompt with n == 1 streams plain events; anything else tags each with `index`
        indexed = not single or jobs[0].params.n > 1
        incremental = state.config.incremental_streaming_output

        async def produce(sse: SSEWriter) -> None:
            def on_chunk(k: int, chunk: StreamChunk) -> None:  # inside the engine's step
                gen = gens[k]
                out = _output(state, gen, gen.choices[chunk.index], with_text,
                              chunk if incremental else None)
                if indexed:
                    out.index = k * gen.job.params.n + chunk.index
                sse.emit(out)

            await deliver_all(gens, on_chunk)

        # each event holds the output so far (unless --incremental-streaming-output): a
        # client that falls behind gets the newest
        return await stream_events(request, produce, cumulative=not (indexed or incremental))
    await run_all(gens)
    outs = [_output(state, g, c, with_text) for g in gens for c in g.choices]
    return json_response(outs[0] if single and len(outs) == 1 else outs)


async def _jobs(state: ServerState, body: GenerateRequest) -> tuple[list[Job], bool]:
    """Validate the whole request and build one Job per prompt; nothing is submitted yet.
    Returns the jobs and whether the request was a single prompt (not a batch)."""
    for name in ("lora_path", "modalities", "token_ids_logprob"):
        if getattr(body, name) is not None:
            raise bad_request(f"`{name}` is not supported yet", name)
    texts: Optional[list[str]] = None
    if body.text is not None and body.input_ids is not None:
        raise bad_request("give either text or input_ids, not both", "text")
    if body.text is not None:
        single = isinstance(body.text, str)
        texts = [body.text] if single else body.text
        if not texts:
            raise bad_request("text must not be an empty list", "text")
        param = "text"
    elif body.input_ids is not None:
        ids_list, single = _id_lists(state, body.input_ids)
        param = "input_ids"
    else:
        raise bad_request("a prompt is required: give text or input_ids", "text")
    count = len(texts) if texts is not None else len(ids_list)

    params = []
    for k, raw in enumerate(_per_prompt(body.sampling_params, count, "sampling_params")):
        sp, explicit_max = _sampling_params(state, raw,
                                            f"sampling_params{'' if single else f'[{k}]'}")
        if body.cache_salt is not None:  # top level, as SGLang's and vLLM's clients send it
            sp = msgspec.structs.replace(sp, cache_salt=body.cache_salt)
        params.append((limits.check_sampling(
            state, sp, max_tokens_param="max_new_tokens" if explicit_max else None),
            explicit_max))
    rids = _per_prompt(body.rid, count, "rid")
    return_lp = _per_prompt(body.return_logprob, count, "return_logprob")
    start_lp = _per_prompt(body.logprob_start_len, count, "logprob_start_len")
    top_lp = _per_prompt(body.top_logprobs_num, count, "top_logprobs_num")
    given = [r for r in rids if r is not None]
    if len(set(given)) != len(given):
        raise bad_request("rids in a batch must be distinct", "rid")
    limits.check_sequences(sum(sp.n for sp, _ in params))
    if texts is not None:
        ids_list = await tokenize_all(state, texts, "text")
    mms = await native_images(state, body.image_data, ids_list, single, body.video_data)

    jobs = []
    for k in range(count):
        sp, explicit_max = params[k]
        ids, mm = mms[k] if mms is not None else (ids_list[k], None)
        limits.check_prompt(state, ids, sp.max_new_tokens,
                            "max_new_tokens" if explicit_max else None, param)
        top = top_lp[k] if return_lp[k] else 0
        start = start_lp[k] if return_lp[k] else -1
        limits.check_logprobs(state, top, start, len(ids))
        jobs.append(Job(rid=rids[k] or uuid.uuid4().hex, input_ids=ids, params=sp,
                        return_logprob=bool(return_lp[k]), logprob_start_len=start,
                        top_logprobs_num=top, mm=mm))
    limits.check_work(state, jobs, "max_new_tokens", "logprob_start_len")
    return jobs, single


def _id_lists(state: ServerState, raw: list) -> tuple[list[list[int]], bool]:
    # lengths first: a prompt longer than the context is refused before its ids are scanned
    if raw and type(raw[0]) is int:
        limits.check_ids_length(state, len(raw), "input_ids")
    else:
        for x in raw:
            if isinstance(x, list):
                limits.check_ids_length(state, len(x), "input_ids")
    if raw and all(type(t) is int for t in raw):
        return [raw], True
    if raw and all(isinstance(x, list) and x and all(type(t) is int for t in x) for x in raw):
        return raw, False
    raise bad_request("input_ids must be a non-empty list of token ids or a non-empty list of "
                      "such lists", "input_ids")


def _per_prompt(value: Any, count: int, name: str) -> list:
    """A scalar (or dict) applies to every prompt; a list gives one value per prompt."""
    if isinstance(value, list):
        if len(value) != count:
            raise bad_request(f"{name} has {len(value)} entries for {count} prompts", name)
        return value
    return [value] * count


def _sampling_params(state: ServerState, raw: Optional[dict],
                     where: str) -> tuple[SamplingParams, bool]:
    """The SamplingParams of one prompt, and whether max_new_tokens was given."""
    raw = raw or {}
    unknown = sorted(set(raw) - _SAMPLING_FIELDS)
    if unknown:
        raise bad_request(f"{where}: unknown sampling parameter(s) {', '.join(unknown)}",
                          f"{where}.{unknown[0]}")
    try:
        sp = msgspec.convert(raw, SamplingParams)
    except msgspec.ValidationError as e:
        hint = limits.max_tokens_hint(state, "max_new_tokens") \
            if str(e).endswith("`$.max_new_tokens`") else ""
        raise bad_request(f"{where}: {e}{hint}", where) from None
    return sp, raw.get("max_new_tokens") is not None


def _output(state: ServerState, gen: Generation, choice: Choice, with_text: bool,
            delta: Optional[StreamChunk] = None) -> GenerateResponse:
    """The choice's output so far, or with `delta` (--incremental-streaming-output) that
    chunk's text, ids and logprobs only; meta_info counts the whole output either way."""
    job = gen.job
    n = len(gen.choices)
    reason = choice.finish_reason
    if reason is not None and reason.get("type") == "length":
        reason = {**reason, "length": len(choice.output_ids)}
    meta = MetaInfo(id=job.rid if n == 1 else f"{job.rid}-{choice.index}",
                    prompt_tokens=choice.prompt_tokens,
                    completion_tokens=len(choice.output_ids),
                    cached_tokens=choice.cached_tokens, finish_reason=reason,
                    e2e_latency=round(time.monotonic() - gen.arrival, 6))
    if job.return_logprob:
        fmt = _LogprobFormat(state, with_text)
        # incremental: the prompt's logprobs ride on the chunk that carries them (the last)
        meta.input_token_logprobs = fmt.tokens(
            (choice.input_logprobs if delta is None else delta.input_token_logprobs) or [])
        meta.output_token_logprobs = fmt.tokens(
            (choice.logprobs if delta is None else delta.logprobs) or [])
        if job.top_logprobs_num:
            meta.input_top_logprobs = fmt.tops(
                (choice.input_top_logprobs if delta is None else delta.input_top_logprobs)
                or [])
            meta.output_top_logprobs = fmt.tops(
                (choice.top_logprobs if delta is None else delta.top_logprobs) or [])
    if delta is not None:
        return GenerateResponse(text=delta.text, output_ids=delta.token_ids, meta_info=meta)
    # encoded at once (the event is written inside the step): no copy of the ids
    return GenerateResponse(text=choice.text, output_ids=choice.output_ids, meta_info=meta)


class _LogprobFormat:
    """SGLang's logprob entries: [logprob, token_id, token_text or null]."""

    def __init__(self, state: ServerState, with_text: bool):
        self._texts = state.token_texts if with_text else None

    def _entry(self, logprob: Optional[float], token_id: int) -> list:
        return [logprob, token_id, self._texts.text(token_id) if self._texts else None]

    def tokens(self, pairs: list) -> list:
        return [self._entry(lp, tid) for lp, tid in pairs]

    def tops(self, rows: list) -> list:
        return [None if row is None else [self._entry(lp, tid) for lp, tid in row]
                for row in rows]


# --------------------------------------------------------------------------- the rest


async def health(request: web.Request) -> web.Response:
    state = get_state(request)
    if state.draining:
        return web.Response(status=503, text="shutting down")
    stalled = getattr(state.engine, "stalled", None)  # the watchdog's finding
    if stalled:
        return web.Response(status=503, text=f"stalled: {stalled}")
    return web.Response(status=200)


async def health_generate(request: web.Request) -> web.Response:
    """Healthy if the engine generates one token in time."""
    state = get_state(request)
    if state.draining:
        raise ApiError(503, "the server is shutting down")
    stalled = getattr(state.engine, "stalled", None)
    if stalled:
        raise ApiError(503, f"the engine is stalled: {stalled}")
    ids = [min(1, state.vocab_size - 1)]
    if state.config.is_embedding:  # an embedding engine proves itself by embedding
        work = state.engine.embed([ids])
    else:
        work = state.engine.generate(
            input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0.0},
            rid=f"health-{uuid.uuid4().hex}")
    try:
        await asyncio.wait_for(work, _HEALTH_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ApiError(503, f"the engine did not answer in {_HEALTH_TIMEOUT_S} s")
    return web.Response(status=200)


async def get_model_info(request: web.Request) -> web.Response:
    state = get_state(request)
    cfg = state.config
    return json_response({
        "model_path": cfg.model_path or state.model_name,
        "tokenizer_path": cfg.tokenizer_path or cfg.model_path,
        "served_model_name": state.model_name,
        "is_generation": not cfg.is_embedding,
        "context_length": state.context_len,
        "vocab_size": state.vocab_size,
        # the resolved template (tokenizer's or --chat-template), for frontend clients
        "chat_template": getattr(state.engine, "chat_template", None),
        # a vision-language model's image placeholder (frontends put it where images go)
        "image_token": getattr(getattr(state.engine, "images", None), "placeholder", None),
    })


async def get_server_info(request: web.Request) -> web.Response:
    """The configuration (API key redacted) and live engine state, memory included: the
    debug view that tests use to check that no KV slot leaked."""
    state = get_state(request)
    info = msgspec.to_builtins(state.config)
    for key in ("api_key", "admin_api_key"):
        if info.get(key):
            info[key] = "<redacted>"
    engine = state.engine
    stats = getattr(getattr(engine, "scheduler", None), "stats", None)
    memory = engine.memory_state()
    info.update({
        "version": asgl.__version__,
        # SGLang's name for the KV pool's size in tokens (its clients size batches by it)
        "max_total_num_tokens": memory.get("capacity"),
        "context_len": state.context_len,
        "vocab_size": state.vocab_size,
        "uptime_s": round(time.time() - state.started_at, 3),
        "draining": state.draining,
        "memory_state": memory,
        "scheduler_stats": dict(vars(stats))
        if stats is not None else None,
    })
    grammar_cache = getattr(engine, "grammar_cache_info", None)
    if grammar_cache is not None:  # compiled grammars held, and the cache's bounds
        info["grammar_cache"] = grammar_cache()
    return json_response(info)


async def flush_cache(request: web.Request) -> web.Response:
    """Drop the prefix cache. Refused (400) while requests hold cached prefixes."""
    engine = get_state(request).engine
    flush = getattr(engine, "flush_cache", None)
    if flush is not None:
        ok = flush()
    else:
        reset = getattr(getattr(engine, "cache", None), "reset", None)
        ok = reset() if reset is not None else True
    if not ok:
        raise bad_request("cannot flush the cache while requests are running; retry when idle")
    return web.Response(text="Cache flushed.\n")


async def abort_request(request: web.Request) -> web.Response:
    state = get_state(request)
    body = await read_json(request, AbortRequest)
    if body.abort_all:
        abort_all = getattr(state.engine, "abort_all", None)
        if abort_all is None:
            raise bad_request("abort_all is not supported by this engine", "abort_all")
        aborted = abort_all()
        return json_response({"success": True, "aborted": aborted})
    rids = [body.rid] if isinstance(body.rid, str) else body.rid
    if not rids or rids == [""]:
        raise bad_request("give rid (one id or a list), or abort_all: true", "rid")
    aborted = [rid for rid in rids if state.engine.abort(rid)]
    return json_response({"success": bool(aborted), "aborted": aborted})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/get_model_info", get_model_info)
    app.router.add_get("/get_server_info", get_server_info)
    app.router.add_get("/server_info", get_server_info)  # SGLang's newer name
    app.router.add_get("/health/", health)
    app.router.add_post("/flush_cache", flush_cache)
    app.router.add_get("/flush_cache", flush_cache)  # older SGLang clients use GET
    app.router.add_post("/abort_request", abort_request)
