"""POST /v1/chat/completions: chat through the model's chat template (or --chat-template).

OpenAI fields that we do not implement (tools, response_format other than text, audio,
...) are refused with a 400 naming the field, never ignored. A stream sends, per choice,
a first chunk with the role, then content deltas, the last with its finish_reason; with
`stream_options.include_usage`, a final chunk with empty choices and the usage.
"""

from __future__ import annotations

import time

from aiohttp import web
from msgspec import UNSET

from asgl.server import limits
from asgl.server.errors import bad_request
from asgl.server.generation import Choice, Generation, Job, merged_events, run_all
from asgl.server.jsonio import json_response, read_json
from asgl.server.openai_common import (chat_logprobs, check_stream_options, finish_reason,
                                       new_id, now, response_model, sampling_params, usage)
from asgl.server.prompts import messages_to_dicts, render_chat, tokenize_rendered
from asgl.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice,
                                  ChatCompletionChunk, ChatCompletionRequest,
                                  ChatCompletionResponse, Delta)
from asgl.server.sse import SSEWriter, stream_events
from asgl.server.state import ServerState, get_state


async def chat_completions(request: web.Request) -> web.StreamResponse:
    arrival = time.monotonic()
    state = get_state(request)
    req = await read_json(request, ChatCompletionRequest)
    _refuse_unsupported(req)
    include_usage = check_stream_options(req)
    max_tokens, param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:  # the newer name wins
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    sp = sampling_params(state, req, max_tokens, param)
    top_n = req.top_logprobs or 0
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    limits.check_sequences(sp.n)
    messages = messages_to_dicts(req.messages)
    add_gen = True if req.add_generation_prompt is None else req.add_generation_prompt
    prompt = await render_chat(state, messages, add_gen)
    ids = await tokenize_rendered(state, prompt)
    limits.check_prompt(state, ids, max_tokens, param if max_tokens is not None else None,
                        "messages")
    if req.logprobs:
        limits.check_logprobs(state, top_n, -1, len(ids), "top_logprobs")
    chat_id, rid = new_id("chatcmpl")
    job = Job(rid=rid, input_ids=ids, params=sp, return_logprob=bool(req.logprobs),
              top_logprobs_num=top_n)
    limits.check_admission(state, sp.n)
    gen = Generation(state, job, arrival)
    view = _View(state, req, gen, chat_id)
    if req.stream:
        return await stream_events(request, lambda sse: view.stream(sse, include_usage))
    await run_all([gen])
    return json_response(ChatCompletionResponse(
        id=chat_id, created=now(), model=view.model,
        choices=[view.choice(c) for c in gen.choices], usage=usage([gen])))


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise bad_request("tools (function calling) are not supported yet", "tools")
    if req.tool_choice not in (None, "none"):
        raise bad_request("tool_choice is not supported yet (tools are not)", "tool_choice")
    if req.functions or req.function_call is not None:
        raise bad_request("functions / function_call are not supported", "functions")
    fmt = req.response_format
    if fmt is not None and fmt.get("type") != "text":
        raise bad_request(f"response_format {fmt.get('type')!r} is not supported yet (only "
                          f"'text')", "response_format")
    if req.modalities not in (None, ["text"]) or req.audio is not None:
        raise bad_request("only text output is supported", "modalities")
    for name in ("prediction", "reasoning_effort", "web_search_options"):
        if getattr(req, name) is not None:
            raise bad_request(f"{name} is not supported", name)
    if req.store:
        raise bad_request("store is not supported", "store")
    # metadata, service_tier, parallel_tool_calls and user change nothing here: accepted


class _View:
    def __init__(self, state: ServerState, req: ChatCompletionRequest, gen: Generation,
                 chat_id: str):
        self.state = state
        self.gen = gen
        self.id = chat_id
        self.created = now()
        self.model = response_model(state, req.model)
        self.logprobs = bool(req.logprobs)
        self.top_n = req.top_logprobs or 0

    def choice(self, c: Choice) -> ChatChoice:
        logprobs = None
        if self.logprobs:
            logprobs = chat_logprobs(self.state.token_texts, c.logprobs, c.top_logprobs,
                                     self.top_n)
        return ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                          logprobs=logprobs, finish_reason=finish_reason(c.finish_reason))

    def _chunk(self, choice: ChatChunkChoice, include_usage: bool) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[choice], usage=None if include_usage else UNSET)

    async def stream(self, sse: SSEWriter, include_usage: bool) -> None:
        started: set[int] = set()
        async for _, chunk in merged_events([self.gen]):
            i = chunk.index
            if i not in started:
                started.add(i)
                await sse.send(self._chunk(ChatChunkChoice(
                    index=i, delta=Delta(role="assistant", content="")), include_usage))
            if not (chunk.text or chunk.finished or (self.logprobs and chunk.logprobs)):
                continue
            logprobs = None
            if self.logprobs and chunk.logprobs:
                logprobs = chat_logprobs(self.state.token_texts, chunk.logprobs,
                                         chunk.top_logprobs or [], self.top_n)
            delta = Delta(content=chunk.text) if chunk.text else Delta()
            await sse.send(self._chunk(ChatChunkChoice(
                index=i, delta=delta, logprobs=logprobs,
                finish_reason=finish_reason(chunk.finish_reason)), include_usage))
        if include_usage:
            await sse.send(ChatCompletionChunk(id=self.id, created=self.created,
                                               model=self.model, choices=[],
                                               usage=usage([self.gen])))
