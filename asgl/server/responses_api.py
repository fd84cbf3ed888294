"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

A request is turned into the chat that /v1/chat/completions would run (the same template,
tool prompt, sampling fields and parsers), so both routes answer alike:

- `input`: a text (one user message) or a list of items: messages (`role` + text or
  `input_text` / `output_text` parts), `function_call` (a past call) and
  `function_call_output` (its result); `instructions` becomes the system message.
- `tools`: function tools (`{"type": "function", "name", "parameters"}`); calls come back
  as `function_call` output items. `text.format` is `response_format` (json_schema /
  json_object); `reasoning.effort` is passed to the template as reasoning_effort, and
  with --reasoning-parser the reasoning is a `reasoning` output item.
- `stream`: the events `response.created`, `response.in_progress`,
  `response.output_item.added`, `response.content_part.added`,
  `response.output_text.delta` ... `.done`, `response.function_call_arguments.delta` /
  `.done`, `response.output_item.done`, `response.completed`.
- `store` (default true) keeps the response and its conversation in a bounded in-memory
  store (the oldest go first, `MAX_STORED`): `previous_response_id` continues it, GET
  returns it, DELETE removes it.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import Any, Optional, Union

import msgspec
from aiohttp import web

from asgl.server import limits
from asgl.server.errors import ApiError, bad_request
from asgl.server.generation import Generation, Job, run_all
from asgl.server.jsonio import json_response, read_json
from asgl.server.openai_common import sampling_params
from asgl.server.prompts import messages_to_dicts, render_chat, template_text, tokenize_rendered
from asgl.server.protocol import ChatCompletionRequest
from asgl.server.reasoning_grammar import after_reasoning
from asgl.server.reasoning_parsers import make_parser
from asgl.server.sse import SSEWriter, stream_events
from asgl.server.responses_view import ResponseView
from asgl.server.state import get_state
from asgl.server.tool_calls import ToolSetup, get_format, with_tool_prompt

MAX_STORED = 1024  # responses kept for previous_response_id / GET (the oldest go first)
_REQ = dict(forbid_unknown_fields=True, kw_only=True)


class ResponsesRequest(msgspec.Struct, **_REQ):
    input: Union[str, list[Any]]
    model: Optional[str] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None
    stream: Optional[bool] = None
    store: Optional[bool] = None
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    text: Optional[dict[str, Any]] = None
    reasoning: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    truncation: Optional[str] = None
    include: Optional[list[str]] = None
    service_tier: Optional[str] = None
    background: Optional[bool] = None
    top_logprobs: Optional[int] = None
    # extensions (vLLM accepts the sampling fields of chat here too)
    seed: Optional[int] = None
    top_k: Optional[int] = None
    stop: Union[str, list[str], None] = None


class _Stored(msgspec.Struct):
    response: dict
    messages: list[dict]  # the conversation after this response (for continuations)


RESPONSES = web.AppKey("asgl_responses", OrderedDict)


def _store(request: web.Request) -> OrderedDict:
    return request.app[RESPONSES]


# --------------------------------------------------------------------------- request → chat


def _input_messages(req: ResponsesRequest) -> list[dict]:
    """The request's input as chat messages (OpenAI's shapes, before templating)."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    out: list[dict] = []
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role"), "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id", ""), "type": "function", "function": {
                "name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": _text(item.get("output"), where)})
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again
        else:
            raise bad_request(f"{where}: input items of type {kind!r} are not supported",
                              where)
    return out


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("input_text",
                                                                      "output_text", "text"):
                raise bad_request(f"{where}.content[{j}]: only text parts are supported",
                                  f"{where}.content")
            texts.append(part.get("text", ""))
        return "".join(texts)
    raise bad_request(f"{where}.content must be text or a list of text parts", where)


def _chat_tools(tools: Optional[list]) -> Optional[list]:
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise bad_request(f"tools[{i}]: only function tools are supported", f"tools[{i}]")
        out.append({"type": "function", "function": {
            k: t[k] for k in ("name", "description", "parameters") if k in t}})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: Optional[dict]) -> Optional[dict]:
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "output"), "schema": fmt.get("schema", {})}}
    return {"type": fmt["type"]}


def _refuse(req: ResponsesRequest) -> None:
    if req.background:
        raise bad_request("background responses are not supported", "background")
    if req.truncation not in (None, "disabled"):
        raise bad_request("only truncation 'disabled' is supported", "truncation")
    if req.top_logprobs:
        raise bad_request("top_logprobs is not supported on /v1/responses yet", "top_logprobs")


# --------------------------------------------------------------------------- the handler


async def create_response(request: web.Request) -> web.StreamResponse:
    arrival = time.monotonic()
    state = get_state(request)
    req = await read_json(request, ResponsesRequest)
    _refuse(req)
    history: list[dict] = []
    if req.previous_response_id is not None:
        stored = _store(request).get(req.previous_response_id)
        if stored is None:
            raise ApiError(404, f"no stored response {req.previous_response_id!r} (it was "
                           f"never stored, was deleted, or was evicted: the store keeps "
                           f"{MAX_STORED})", "previous_response_id")
        history = [dict(m) for m in stored.messages]
    new_messages = _input_messages(req)
    conversation = history + new_messages
    # instructions apply to this turn only: a continuation does not inherit them
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    conversation_for_model = system + conversation
    chat = _as_chat({
        "messages": [_message_struct_fields(m) for m in conversation_for_model],
        "model": req.model, "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
        "top_k": req.top_k, "stop": req.stop, "tools": _chat_tools(req.tools),
        "tool_choice": _chat_tool_choice(req.tool_choice),
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": _response_format(req.text)})
    tools = ToolSetup.from_request(chat.tools, chat.tool_choice, chat.parallel_tool_calls,
                                   config=state.config)
    fmt = get_format(state.config.tool_call_parser)
    sp = sampling_params(state, chat, chat.max_completion_tokens, "max_output_tokens")
    if tools is not None and tools.constrained:
        sp = limits.check_sampling(state, msgspec.structs.replace(
            sp, structural_tag=fmt.structural_tag(tools)), user_grammar=False)
    messages = messages_to_dicts(chat.messages)
    messages, template_tools = with_tool_prompt(messages, tools, fmt, template_text(state))
    effort = (req.reasoning or {}).get("effort")
    kwargs = {"reasoning_effort": effort} if effort else {}
    prompt = await render_chat(state, messages, True, template_tools, False, kwargs)
    ids = await tokenize_rendered(state, prompt)
    limits.check_prompt(state, ids, sp.max_new_tokens, "max_output_tokens"
                        if req.max_output_tokens is not None else None, "input")
    reasoning = state.config.reasoning_parser
    if reasoning and make_parser(reasoning).needs_special_tokens or \
            (tools is not None and getattr(fmt, "needs_special_tokens", False)):
        sp = msgspec.structs.replace(sp, skip_special_tokens=False)
    sp = after_reasoning(sp, reasoning, None)  # a grammar applies to the answer only
    rid = uuid.uuid4().hex
    job = Job(rid=rid, input_ids=ids, params=sp)
    limits.check_work(state, [job], "max_output_tokens")
    limits.check_admission(state, 1)
    gen = Generation(state, job, arrival)
    view = ResponseView(state, req, gen, f"resp_{rid}", tools, fmt, reasoning)
    store = req.store is not False

    def remember(response: dict) -> None:
        if not store:
            return
        after = conversation + view.output_messages()
        responses = _store(request)
        responses[response["id"]] = _Stored(response, after)
        while len(responses) > MAX_STORED:
            responses.popitem(last=False)

    if req.stream:
        async def produce(sse: SSEWriter) -> None:
            remember(await view.stream(sse))
        return await stream_events(request, produce)
    await run_all([gen])
    response = view.final()
    remember(response)
    return json_response(response)


def _as_chat(fields: dict) -> ChatCompletionRequest:
    """The chat request a Responses request amounts to; a field of the wrong type (an
    input item's role, a tool's parameters) is a 400 naming where it came from."""
    try:
        return msgspec.convert(fields, ChatCompletionRequest)
    except msgspec.ValidationError as e:
        where = str(e).rsplit("`$.", 1)[-1].rstrip("`") if "`$." in str(e) else "input"
        param = "input" if where.startswith("messages") else where.split(".")[0]
        raise bad_request(f"{param}: {e}", param) from None


def _message_struct_fields(m: dict) -> dict:
    return {k: v for k, v in m.items() if k in ("role", "content", "tool_calls",
                                                  "tool_call_id", "name")}


async def get_response(request: web.Request) -> web.Response:
    stored = _store(request).get(request.match_info["id"])
    if stored is None:
        raise ApiError(404, f"no stored response {request.match_info['id']!r}", "id")
    return json_response(stored.response)


async def delete_response(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    if _store(request).pop(rid, None) is None:
        raise ApiError(404, f"no stored response {rid!r}", "id")
    return json_response({"id": rid, "object": "response", "deleted": True})


def add_routes(app: web.Application) -> None:
    app[RESPONSES] = OrderedDict()
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{id}", get_response)
    app.router.add_delete("/v1/responses/{id}", delete_response)
