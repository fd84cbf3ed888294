"""POST /v1/completions: OpenAI's legacy text completions, streaming or not.

Choices are numbered prompt-major (`prompt_index * n + i`), as OpenAI numbers them for a
batch of prompts. With `echo` each choice starts with its prompt (and, with `logprobs`,
the prompt's logprobs, the first token's being null).
"""

from __future__ import annotations

import time
from typing import Optional

from aiohttp import web
from msgspec import UNSET

from asgl.server import compat, limits
from asgl.server.errors import bad_request
from asgl.engine.contracts.outputs import StreamChunk
from asgl.server.generation import Choice, Generation, Job, deliver_all, run_all
from asgl.server.jsonio import json_response, read_json
from asgl.server.openai_common import (check_stream_options, completion_logprobs,
                                       finish_reason, new_id, now, response_model,
                                       sampling_params, usage)
from asgl.server.prompts import tokenize_all
from asgl.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from asgl.server.sse import SSEWriter, stream_events
from asgl.server.state import ServerState, get_state

_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


async def completions(request: web.Request) -> web.StreamResponse:
    arrival = time.monotonic()
    state = get_state(request)
    req = await read_json(request, CompletionRequest)
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    include_usage = check_stream_options(req)
    explicit_max = req.max_tokens is not None
    sp = sampling_params(state, req, req.max_tokens if explicit_max else _DEFAULT_MAX_TOKENS,
                         "max_tokens", explicit_max)
    if req.best_of is not None and req.best_of != sp.n:
        raise bad_request("best_of is not supported (only best_of == n)", "best_of")
    texts, ids_list = _prompts(state, req.prompt)
    count = len(texts) if texts is not None else len(ids_list)
    limits.check_sequences(count * sp.n)
    if texts is not None:
        ids_list = await tokenize_all(state, texts, "prompt")
    top = req.logprobs
    echo = bool(req.echo)
    cmpl_id, rid = new_id("cmpl")
    jobs = []
    for k, ids in enumerate(ids_list):
        limits.check_prompt(state, ids, sp.max_new_tokens, "max_tokens" if explicit_max else None,
                            "prompt")
        start = 0 if (echo and top is not None) else -1
        if top is not None:
            limits.check_logprobs(state, top, start, len(ids), "logprobs")
        jobs.append(Job(rid=rid if count == 1 else f"{rid}-{k}", input_ids=ids, params=sp,
                        return_logprob=top is not None, logprob_start_len=start,
                        top_logprobs_num=top or 0))
    limits.check_work(state, jobs, "max_tokens", "echo")
    limits.check_admission(state, count * sp.n)
    gens = [Generation(state, job, arrival) for job in jobs]
    view = _View(state, req, texts, gens, cmpl_id, echo)
    if req.stream:
        return await stream_events(request, lambda sse: view.stream(sse, include_usage))
    await run_all(gens)
    choices = [view.choice(k, c) for k, g in enumerate(gens) for c in g.choices]
    return json_response(CompletionResponse(id=cmpl_id, created=now(), model=view.model,
                                            choices=choices, usage=usage(gens)))


def _prompts(state: ServerState,
             prompt) -> tuple[Optional[list[str]], Optional[list[list[int]]]]:
    """(texts, None) or (None, id lists) from OpenAI's four prompt shapes."""
    # lengths first: a prompt longer than the context is refused before its ids are scanned
    if isinstance(prompt, list) and prompt and type(prompt[0]) is int:
        limits.check_ids_length(state, len(prompt), "prompt")
    elif isinstance(prompt, list):
        for p in prompt:
            if isinstance(p, list):
                limits.check_ids_length(state, len(p), "prompt")
    if isinstance(prompt, str):
        return [prompt], None
    if prompt and all(isinstance(p, str) for p in prompt):
        return prompt, None
    if prompt and all(type(t) is int for t in prompt):
        return None, [prompt]
    if prompt and all(isinstance(p, list) and p and all(type(t) is int for t in p)
                      for p in prompt):
        return None, prompt
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a "
                      "list of lists of token ids (none empty)", "prompt")


class _View:
    """Turns generations into OpenAI choices and stream chunks."""

    def __init__(self, state: ServerState, req: CompletionRequest,
                 texts: Optional[list[str]], gens: list[Generation], cmpl_id: str, echo: bool):
        self.state = state
        self.texts = texts
        self.gens = gens
        self.id = cmpl_id
        self.created = now()
        self.model = response_model(state, req.model)
        self.echo = echo
        self.logprobs = req.logprobs is not None
        self.continuous = compat.continuous_usage(req)

    def prompt_text(self, k: int) -> str:
        if self.texts is not None:
            return self.texts[k]
        return self.state.token_texts.decode(self.gens[k].job.input_ids)

    def choice(self, k: int, c: Choice) -> CompletionChoice:
        n = len(self.gens[k].choices)
        prefix = self.prompt_text(k) if self.echo else ""
        logprobs = None
        if self.logprobs:
            pairs, tops = c.logprobs, c.top_logprobs
            if self.echo:
                pairs, tops = _with_prompt(c, pairs, tops)
            logprobs, _ = completion_logprobs(self.state.token_texts, pairs, tops, 0)
        return CompletionChoice(index=k * n + c.index, text=prefix + c.text, logprobs=logprobs,
                                finish_reason=finish_reason(c.finish_reason),
                                matched_stop=compat.matched_stop(c.finish_reason))

    async def stream(self, sse: SSEWriter, include_usage: bool) -> None:
        offsets: dict[int, int] = {}  # choice index -> text offset of its next token

        def on_chunk(k: int, chunk: StreamChunk) -> None:  # inside the engine's step
            gen = self.gens[k]
            c = gen.choices[chunk.index]
            index = k * len(gen.choices) + chunk.index
            text = chunk.text
            pairs, tops = chunk.logprobs or [], chunk.top_logprobs or []
            if index not in offsets:  # the choice's first chunk
                offsets[index] = 0
                if self.echo:
                    text = self.prompt_text(k) + text
                    if self.logprobs:
                        pairs, tops = _with_prompt(c, pairs, tops)
            if not (text or pairs or chunk.finished):
                return  # nothing to tell yet (text held back by a possible stop string)
            logprobs = None
            if self.logprobs:
                logprobs, offsets[index] = completion_logprobs(
                    self.state.token_texts, pairs, tops, offsets[index])
            sse.emit(CompletionResponse(
                id=self.id, created=self.created, model=self.model,
                choices=[CompletionChoice(
                    index=index, text=text, logprobs=logprobs,
                    finish_reason=finish_reason(chunk.finish_reason),
                    matched_stop=compat.matched_stop(chunk.finish_reason) if chunk.finished
                    else UNSET)],
                usage=compat.chunk_usage(include_usage, self.continuous, self.gens)))

        await deliver_all(self.gens, on_chunk)
        if include_usage:
            await sse.send(CompletionResponse(id=self.id, created=self.created, model=self.model,
                                              choices=[], usage=usage(self.gens)))


def _with_prompt(c: Choice, pairs: list, tops: list) -> tuple[list, list]:
    """Output logprobs preceded by the prompt's (echo): rows stay aligned by position."""
    prompt = c.input_logprobs or []
    prompt_tops = c.input_top_logprobs or [None] * len(prompt)
    tops = list(tops) + [None] * (len(pairs) - len(tops))  # no top rows when logprobs=0
    return prompt + list(pairs), prompt_tops + tops
