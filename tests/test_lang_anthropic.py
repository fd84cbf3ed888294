"""The Anthropic backend's requests, checked by a local aiohttp stub of the Messages API
(`POST /v1/messages`): headers, the system field, alternating turns, prefill, stop
sequences, image blocks, streaming events, errors."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web

import asgl as sgl

pytestmark = pytest.mark.timeout(60)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8


class Stub:
    """A Messages API that checks each request's shape and answers with the next reply."""

    def __init__(self):
        self.requests: list[dict] = []
        self.replies: list[str] = []
        self.url = ""

    async def messages(self, request: web.Request) -> web.StreamResponse:
        assert request.headers["x-api-key"] == "test-key"
        assert request.headers["anthropic-version"] == "2023-06-01"
        assert request.content_type == "application/json"
        body = await request.json()
        self.requests.append(body)
        if body["model"] == "refuse":
            return web.json_response({"type": "error", "error": {
                "type": "invalid_request_error", "message": "model: unknown model"}}, status=400)
        check_shape(body)
        reply = self.replies.pop(0)
        if not body.get("stream"):
            return web.json_response({
                "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                "content": [{"type": "text", "text": reply}], "stop_reason": "end_turn",
                "usage": {"input_tokens": 11, "output_tokens": 3}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(name: str, data: dict) -> None:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

        await event("message_start", {"type": "message_start", "message": {
            "id": "msg_2", "usage": {"input_tokens": 11, "output_tokens": 1}}})
        await event("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}})
        for i in range(0, len(reply), 3):
            await event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta",
                                                          "text": reply[i:i + 3]}})
        await event("content_block_stop", {"type": "content_block_stop", "index": 0})
        await event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": "end_turn"},
                                      "usage": {"output_tokens": 5}})
        await event("message_stop", {"type": "message_stop"})
        return resp


def check_shape(body: dict) -> None:
    """What the Messages API requires of a request."""
    assert isinstance(body["max_tokens"], int) and body["max_tokens"] > 0
    messages = body["messages"]
    assert messages and messages[0]["role"] == "user"
    for m in messages:
        assert m["role"] in ("user", "assistant")  # system goes to the top-level field
        assert isinstance(m["content"], (str, list))
    last = messages[-1]
    if last["role"] == "assistant":  # a prefill must not end in whitespace
        assert last["content"] == last["content"].rstrip()
    for stop in body.get("stop_sequences", []):
        assert stop.strip(), "whitespace-only stop sequences are refused"
    if "temperature" in body:
        assert 0 <= body["temperature"] <= 1


@pytest.fixture(scope="module")
def stub():
    """The stub on its own loop and thread, as a remote API would be."""
    stub = Stub()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/messages", stub.messages)
    runner = web.AppRunner(app)
    ready = threading.Event()

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        stub.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    yield stub
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


@pytest.fixture()
def claude(stub):
    stub.requests.clear()
    stub.replies.clear()
    return sgl.Anthropic("claude-test", api_key="test-key", base_url=stub.url)


def test_multi_turn_request_shape(stub, claude):
    @sgl.function
    def multi_turn(s):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user("What is the capital of France?")
        s += sgl.assistant(sgl.gen("answer_1", max_tokens=32, temperature=0.5))
        s += sgl.user("And of Spain?")
        s += sgl.assistant(sgl.gen("answer_2", stop=["\n", "END"]))

    stub.replies += ["Paris.", "Madrid.\nMore"]
    state = multi_turn.run(backend=claude)
    first, second = stub.requests
    assert first == {"model": "claude-test", "max_tokens": 32, "temperature": 0.5,
                     "system": "You are a helpful assistant.",
                     "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    assert second["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Spain?"}]
    assert second["max_tokens"] == 128 and second["stop_sequences"] == ["END"]
    # "\n" cannot be sent as a stop sequence: it is applied to the answer here
    assert state["answer_2"] == "Madrid."
    assert state.get_meta_info("answer_1") == {"id": "msg_1", "prompt_tokens": 11,
                                               "completion_tokens": 3, "cached_tokens": 0,
                                               "finish_reason": "end_turn"}
    assert [m["content"] for m in state.messages()][-1] == "Madrid."


def test_prefill_continues_a_started_assistant_turn(stub, claude):
    import os
    import sys
    from server_fixture import REPO
    sys.path.insert(0, os.path.join(REPO, "examples"))
    import chat_roles

    stub.replies += [" Paris\nis the capital."]
    state = chat_roles.chat_example.run(backend=claude)
    body = stub.requests[0]
    assert body["messages"][-1] == {"role": "assistant", "content": "Answer:"}  # trimmed
    assert body["system"] == "You are a helpful assistant."
    assert state.messages()[-1]["content"] == "Answer: Paris"  # the space is not doubled


def test_streaming_events(stub, claude):
    @sgl.function
    async def prog(s):
        s += sgl.user("Count.")
        with s.assistant():
            await s.gen("n", stop="\n\n")

    stub.replies += ["one two three\n\nfour"]

    async def main():
        state = await prog.arun(backend=claude, stream=True)
        return state, [piece async for piece in state.text_async_iter("n")]

    state, pieces = asyncio.run(main())
    assert stub.requests[0]["stream"] is True and "stop_sequences" not in stub.requests[0]
    assert "".join(pieces) == state["n"] == "one two three" and len(pieces) > 1
    assert state.get_meta_info("n")["finish_reason"] == "stop_sequence"


def test_image_blocks(stub, claude):
    @sgl.function
    def image_qa(s):
        s += sgl.user(sgl.image(PNG) + "What is this?")
        s += sgl.assistant(sgl.gen("answer"))

    stub.replies += ["A tiny image."]
    assert image_qa.run(backend=claude)["answer"] == "A tiny image."
    content = stub.requests[0]["messages"][0]["content"]
    assert content[0]["type"] == "image"
    assert content[0]["source"]["type"] == "base64"
    assert content[0]["source"]["media_type"] == "image/png"
    assert content[1] == {"type": "text", "text": "What is this?"}


def test_select_falls_back_to_a_short_greedy_gen(stub, claude):
    @sgl.function
    def tool_use(s):
        s += "To answer this question: what is 2 + 2? I need to use a "
        s += sgl.gen("tool", choices=["calculator", "search engine"])

    stub.replies += ["Calculator, clearly."]
    state = tool_use.run(backend=claude)
    assert state["tool"] == "calculator"
    assert state.get_meta_info("tool")["method"] == "closest_match"
    body = stub.requests[0]
    assert body["temperature"] == 0.0 and body["max_tokens"] <= 32
    assert body["messages"] == [{"role": "user", "content":
                                 "To answer this question: what is 2 + 2? I need to use a "}]


def test_api_errors_are_clear(stub):
    backend = sgl.Anthropic("refuse", api_key="test-key", base_url=stub.url)

    @sgl.function
    def prog(s):
        s += sgl.user("hi") + sgl.assistant(sgl.gen("x"))

    with pytest.raises(sgl.BackendError, match="unknown model") as info:
        prog.run(backend=backend)
    assert info.value.status == 400
