"""POST /v1/chat/completions: chat through the model's chat template (or --chat-template).

OpenAI fields that we do not implement (audio, predictions, ...) are refused with a 400
naming the field, never ignored. `response_format` (json_object / json_schema) becomes a
grammar; `tools` are shown to the model and its calls parsed (tool_calls.py). A stream
sends, per choice, a first chunk with the role, then content and tool-call deltas, the
last with its finish_reason; with `stream_options.include_usage`, a final chunk with
empty choices and the usage.
"""

from __future__ import annotations

import time
from typing import Optional

import msgspec
from aiohttp import web
from msgspec import UNSET

from asgl.server import compat, limits
from asgl.server.chat_parsing import ChoiceParser
from asgl.server.errors import bad_request
from asgl.engine.contracts.outputs import StreamChunk
from asgl.server.generation import Choice, Generation, Job, deliver_all, run_all
from asgl.server.images import chat_images, load_all
from asgl.server.jsonio import json_response, read_json
from asgl.server.openai_common import (chat_logprobs, check_stream_options, finish_reason,
                                       new_id, now, response_model, sampling_params, usage)
from asgl.server.prompts import (check_template_kwargs, messages_to_dicts, render_chat,
                                 template_text, tokenize_rendered)
from asgl.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice,
                                  ChatCompletionChunk, ChatCompletionRequest,
                                  ChatCompletionResponse, Delta, DeltaFunctionCall,
                                  DeltaToolCall, FunctionCall, ToolCall)
from asgl.server.sse import SSEWriter, stream_events
from asgl.server.reasoning_grammar import after_reasoning
from asgl.server.reasoning_parsers import make_parser
from asgl.server.state import ServerState, get_state
from asgl.server.tool_calls import (CallDelta, ToolFormat, ToolSetup, get_format,
                                    with_tool_prompt)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    arrival = time.monotonic()
    state = get_state(request)
    req = await read_json(request, ChatCompletionRequest)
    _refuse_unsupported(req)
    extras = compat.message_extras(await request.read())
    tools = ToolSetup.from_request(req.tools, req.tool_choice, req.parallel_tool_calls,
                                   config=state.config)
    fmt = get_format(state.config.tool_call_parser)
    include_usage = check_stream_options(req)
    max_tokens, param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:  # the newer name wins
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    sp = sampling_params(state, req, max_tokens, param)
    if tools is not None and tools.constrained:  # calls only, in the parser's format
        if sp.regex is not None or sp.json_schema is not None or sp.ebnf is not None or \
                sp.structural_tag is not None:
            raise bad_request(f"tool_choice {tools.mode!r} constrains the output to tool "
                              f"calls: it cannot be combined with response_format, regex or "
                              f"ebnf", "tool_choice")
        sp = limits.check_sampling(state, msgspec.structs.replace(
            sp, structural_tag=fmt.structural_tag(tools)), user_grammar=False)
    top_n = req.top_logprobs or 0
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    limits.check_sequences(sp.n)
    images = chat_images(state)  # None: a text-only model (image parts are a 400)
    messages = messages_to_dicts(req.messages, images, extras)
    messages, template_tools = with_tool_prompt(messages, tools, fmt, template_text(state))
    add_gen, cont = compat.continue_final(messages, req.continue_final_message,
                                          req.add_generation_prompt)
    template_kwargs = check_template_kwargs(req.chat_template_kwargs)
    if req.reasoning_effort is not None:  # gpt-oss's template reads it
        template_kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    prompt = await render_chat(state, messages, add_gen, template_tools, cont, template_kwargs)
    reasoning = _reasoning_parser_name(state, req)
    parsed_tools = tools is not None and tools.mode != "none"
    if (reasoning and make_parser(reasoning).needs_special_tokens) or \
            (parsed_tools and getattr(fmt, "needs_special_tokens", False)):
        # the parsers read markers that are special tokens (harmony's, [TOOL_CALLS])
        sp = msgspec.structs.replace(sp, skip_special_tokens=False)
    sp = after_reasoning(sp, reasoning, _thinking(template_kwargs))  # reasoning_grammar.py
    ids = await tokenize_rendered(state, prompt)
    mm = None
    if images is not None and images.refs:  # decoded off the loop; placeholders expanded
        ids, mm = await state.engine.prepare_images(
            ids, await load_all(state, images.refs), "messages", [w for _, w in images.refs])
    limits.check_prompt(state, ids, max_tokens, param if max_tokens is not None else None,
                        "messages")
    if req.logprobs:
        limits.check_logprobs(state, top_n, -1, len(ids), "top_logprobs")
    chat_id, rid = new_id("chatcmpl")
    job = Job(rid=rid, input_ids=ids, params=sp, return_logprob=bool(req.logprobs),
              top_logprobs_num=top_n, mm=mm)
    limits.check_work(state, [job], param)
    limits.check_admission(state, sp.n)
    gen = Generation(state, job, arrival)
    view = _View(state, req, gen, chat_id, tools, fmt)
    view.reasoning, view.echo = reasoning, compat.echo_prefix(messages, req.echo)
    view.thinking = _thinking(template_kwargs)
    if req.stream:
        return await stream_events(request, lambda sse: view.stream(sse, include_usage))
    await run_all([gen])
    return json_response(ChatCompletionResponse(
        id=chat_id, created=now(), model=view.model,
        choices=[view.choice(c) for c in gen.choices], usage=usage([gen])))


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    if req.functions or req.function_call is not None:
        raise bad_request("functions / function_call are deprecated: use tools / tool_choice",
                          "functions")
    if req.modalities not in (None, ["text"]) or req.audio is not None:
        raise bad_request("only text output is supported", "modalities")
    if req.reasoning_effort not in (None, "minimal", "low", "medium", "high"):
        raise bad_request(f"reasoning_effort must be 'minimal', 'low', 'medium' or 'high', got "
                          f"{req.reasoning_effort!r}", "reasoning_effort")
    for name in ("prediction", "web_search_options"):
        if getattr(req, name) is not None:
            raise bad_request(f"{name} is not supported", name)
    if req.store:
        raise bad_request("store is not supported", "store")
    # metadata, service_tier and user change nothing here: accepted


def _reasoning_parser_name(state: ServerState, req: ChatCompletionRequest) -> Optional[str]:
    """--reasoning-parser unless the request keeps reasoning in the content (SGLang's
    separate_reasoning=false)."""
    return None if req.separate_reasoning is False else state.config.reasoning_parser


def _thinking(template_kwargs: dict) -> Optional[bool]:
    """Whether the request turned thinking on or off in the template (Qwen3's
    enable_thinking, DeepSeek V3.1's thinking); None: the template's default."""
    for key in ("enable_thinking", "thinking"):
        if isinstance(template_kwargs.get(key), bool):
            return template_kwargs[key]
    return None


class _View:
    reasoning: Optional[str] = None  # the reasoning parser's name
    echo = ""  # vLLM's chat echo: the continued assistant message, shown first
    thinking: Optional[bool] = None

    def __init__(self, state: ServerState, req: ChatCompletionRequest, gen: Generation,
                 chat_id: str, tools: Optional[ToolSetup] = None,
                 fmt: Optional[ToolFormat] = None):
        self.state = state
        self.gen = gen
        self.id = chat_id
        self.created = now()
        self.model = response_model(state, req.model)
        self.logprobs = bool(req.logprobs)
        self.top_n = req.top_logprobs or 0
        # tool calls are parsed unless tool_choice is "none"
        self.tools = tools if tools is not None and tools.mode != "none" else None
        self.fmt = fmt
        self.continuous = compat.continuous_usage(req)

    def _parser(self) -> ChoiceParser:
        reasoning = make_parser(self.reasoning, self.thinking) if self.reasoning else None
        tools = self.fmt.parser(self.tools.tools) if self.tools is not None else None
        return ChoiceParser(reasoning, tools)

    def _finish_reason(self, reason: Optional[dict], has_calls: bool) -> Optional[str]:
        text = finish_reason(reason)
        # OpenAI: "tool_calls" when the model chose to call; a forced function ends "stop"
        if has_calls and text == "stop" and self.tools.mode != "named":
            return "tool_calls"
        return text

    def choice(self, c: Choice) -> ChatChoice:
        logprobs = None
        if self.logprobs:
            logprobs = chat_logprobs(self.state.token_texts, c.logprobs, c.top_logprobs,
                                     self.top_n)
        message = AssistantMessage(content=self.echo + c.text)
        reason = finish_reason(c.finish_reason)
        if self.tools is not None or self.reasoning:  # the same parser as a stream's
            parser = self._parser()
            parser.feed(c.text)
            parser.finish()
            if parser.calls or self.reasoning:
                message = AssistantMessage(content=(self.echo + parser.content) or None)
            if self.reasoning:
                message.reasoning_content = parser.reasoning or None
            if parser.calls:
                message.tool_calls = [ToolCall(id=t.id, function=FunctionCall(t.name,
                                                                              t.arguments))
                                      for t in parser.calls]
            if self.tools is not None:
                reason = self._finish_reason(c.finish_reason, bool(parser.calls))
        return ChatChoice(index=c.index, message=message, logprobs=logprobs,
                          finish_reason=reason,
                          matched_stop=compat.matched_stop(c.finish_reason))

    def _chunk(self, choice: ChatChunkChoice, include_usage: bool) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[choice], usage=compat.chunk_usage(
                                       include_usage, self.continuous, [self.gen]))

    async def stream(self, sse: SSEWriter, include_usage: bool) -> None:
        started: set[int] = set()
        parsers = {}

        def on_chunk(_: int, chunk: StreamChunk) -> None:  # inside the engine's step
            i = chunk.index
            if i not in started:
                started.add(i)
                sse.emit(self._chunk(ChatChunkChoice(
                    index=i, delta=Delta(role="assistant", content=self.echo)),
                    include_usage))
                if self.tools is not None or self.reasoning:
                    parsers[i] = self._parser()
            text, calls, thought = chunk.text, [], ""
            reason = finish_reason(chunk.finish_reason)
            if i in parsers:
                parser = parsers[i]
                thought, text, calls = parser.feed(chunk.text)
                if chunk.finished:
                    more_thought, more_text, more_calls = parser.finish()
                    thought, text = thought + more_thought, text + more_text
                    calls = calls + more_calls
                    if self.tools is not None:
                        reason = self._finish_reason(chunk.finish_reason, bool(parser.calls))
            if not (text or calls or thought or chunk.finished or
                    (self.logprobs and chunk.logprobs)):
                return
            logprobs = None
            if self.logprobs and chunk.logprobs:
                logprobs = chat_logprobs(self.state.token_texts, chunk.logprobs,
                                         chunk.top_logprobs or [], self.top_n)
            delta = Delta(content=text or None, reasoning_content=thought or None,
                          tool_calls=[_delta(c) for c in calls] or None)
            sse.emit(self._chunk(ChatChunkChoice(
                index=i, delta=delta, logprobs=logprobs, finish_reason=reason,
                matched_stop=compat.matched_stop(chunk.finish_reason) if chunk.finished
                else UNSET), include_usage))

        await deliver_all([self.gen], on_chunk)
        if include_usage:
            await sse.send(ChatCompletionChunk(id=self.id, created=self.created,
                                               model=self.model, choices=[],
                                               usage=usage([self.gen])))


def _delta(c: CallDelta) -> DeltaToolCall:
    if c.id is not None:  # a call's first delta: id, type, name (and arguments so far)
        return DeltaToolCall(index=c.index, id=c.id, type="function",
                             function=DeltaFunctionCall(name=c.name, arguments=c.arguments))
    return DeltaToolCall(index=c.index, function=DeltaFunctionCall(arguments=c.arguments))
