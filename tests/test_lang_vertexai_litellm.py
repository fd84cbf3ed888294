"""The VertexAI (google-genai) and LiteLLM backends of asgl.lang, with their real client
libraries, against a local stand-in of Gemini's `generateContent` /
`streamGenerateContent` (Vertex express mode paths) and of an OpenAI-compatible
`/v1/chat/completions` (LiteLLM's `openai/` provider): SGLang's README multi-turn example
(roles, two gens) plus a `select`, streaming, images, stop strings and errors.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading

import pytest
from aiohttp import web

import asgl as sgl

pytest.importorskip("google.genai")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price-table fetch
pytest.importorskip("litellm")
pytestmark = pytest.mark.timeout(120)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8
ANSWERS = {"What is the capital of the United States?": "Washington, D.C.",
           "List two local attractions.": "The National Mall and the Smithsonian.",
           "To compute 3 * 7, which tool fits best?": "A calculator, clearly.",
           "Count.": "one two three\n\nfour",
           "What is this?": "A tiny image."}


def _answer(question: str) -> str:
    return ANSWERS.get(question, "I do not know.")


class Standin:
    """Answers each request from its last user text; records the request bodies."""

    def __init__(self):
        self.gemini: list[tuple[str, dict]] = []
        self.openai: list[dict] = []
        self.url = ""

    async def gemini_route(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model, method = request.match_info["model_method"].split(":")
        self.gemini.append((request.path, body))
        assert request.headers.get("x-goog-api-key") == "vertex-key"
        if model == "refuse":
            return web.json_response({"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                                "message": "model refuse not found"}},
                                     status=400)
        last = body["contents"][-1]
        assert last["role"] == "user"
        text = _answer("".join(p.get("text", "") for p in last["parts"]))
        usage = {"promptTokenCount": 9, "candidatesTokenCount": 4, "totalTokenCount": 13}

        def candidate(piece: str, done: bool) -> dict:
            c = {"content": {"role": "model", "parts": [{"text": piece}]}}
            return {**c, "finishReason": "STOP"} if done else c

        if method == "generateContent":
            return web.json_response({"candidates": [candidate(text, True)],
                                      "usageMetadata": usage, "responseId": "gem-1"})
        assert method == "streamGenerateContent" and request.query.get("alt") == "sse"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
        for i, piece in enumerate(pieces):
            done = i == len(pieces) - 1
            chunk = {"candidates": [candidate(piece, done)], "responseId": "gem-2",
                     **({"usageMetadata": usage} if done else {})}
            await resp.write(f"data: {json.dumps(chunk)}\r\n\r\n".encode())
        return resp

    async def chat_route(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.openai.append(body)
        assert request.headers.get("Authorization") == "Bearer litellm-key"
        if body["model"] == "refuse":
            return web.json_response({"error": {"message": "model refuse not found",
                                                "type": "invalid_request_error",
                                                "param": "model", "code": None}}, status=404)
        last = body["messages"][-1]
        assert last["role"] == "user"
        content = last["content"]
        question = content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content if p.get("type") == "text")
        text = _answer(question)
        usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
        if not body.get("stream"):
            return web.json_response({
                "id": "chat-1", "object": "chat.completion", "created": 1,
                "model": body["model"], "usage": usage,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(text), 4):
            chunk = {"id": "chat-2", "object": "chat.completion.chunk", "created": 1,
                     "model": body["model"], "choices": [{"index": 0, "finish_reason": None,
                                                          "delta": {"content": text[i:i + 4]}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        final = {"id": "chat-2", "object": "chat.completion.chunk", "created": 1,
                 "model": body["model"], "usage": usage,
                 "choices": [{"index": 0, "finish_reason": "stop", "delta": {}}]}
        await resp.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        return resp


@pytest.fixture(scope="module")
def standin():
    """The stand-in on its own loop and thread, as a remote API would be."""
    stub = Standin()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1beta1/publishers/google/models/{model_method}", stub.gemini_route)
    app.router.add_post("/v1/chat/completions", stub.chat_route)
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

    threading.Thread(target=serve, daemon=True).start()
    ready.wait(10)
    yield stub
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


@pytest.fixture(params=["vertexai", "litellm"])
def backend(request, standin):
    standin.gemini.clear()
    standin.openai.clear()
    if request.param == "vertexai":
        return sgl.VertexAI("gemini-test", api_key="vertex-key", base_url=standin.url)
    return sgl.LiteLLM("openai/chat-test", api_base=standin.url + "/v1",
                       api_key="litellm-key")


@sgl.function
def multi_turn_question(s, question_1, question_2):
    # SGLang's README example, and a select on the same conversation
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1", max_tokens=64))
    s += sgl.user(question_2)
    s += sgl.assistant(sgl.gen("answer_2", max_tokens=64))
    s += sgl.user("To compute 3 * 7, which tool fits best?")
    s += sgl.assistant(sgl.select("tool", choices=["calculator", "search engine"]))


def _requests(standin: Standin, backend) -> list[dict]:
    """The requests as role/text lists, the same shape for both APIs."""
    if isinstance(backend, sgl.VertexAI):
        out = []
        for _, body in standin.gemini:
            system = "".join(p["text"] for p in body.get("systemInstruction", {})
                             .get("parts", []))
            turns = [("system", system)] if system else []
            turns += [("assistant" if c["role"] == "model" else c["role"],
                       "".join(p.get("text", "") for p in c["parts"]))
                      for c in body["contents"]]
            out.append({"turns": turns,
                        "max_tokens": body["generationConfig"]["maxOutputTokens"],
                        "temperature": body["generationConfig"].get("temperature")})
        return out
    return [{"turns": [(m["role"], m["content"]) for m in body["messages"]],
             "max_tokens": body["max_tokens"], "temperature": body.get("temperature")}
            for body in standin.openai]


def test_readme_multi_turn_with_select(standin, backend):
    state = multi_turn_question.run(
        question_1="What is the capital of the United States?",
        question_2="List two local attractions.", backend=backend)
    assert state["answer_1"] == "Washington, D.C."
    assert state["answer_2"] == "The National Mall and the Smithsonian."
    assert state["tool"] == "calculator"
    assert state.get_meta_info("tool")["method"] == "closest_match"
    assert [m["role"] for m in state.messages()] == [
        "system", "user", "assistant", "user", "assistant", "user", "assistant"]
    first, second, third = _requests(standin, backend)
    assert first["turns"] == [("system", "You are a helpful assistant."),
                              ("user", "What is the capital of the United States?")]
    assert first["max_tokens"] == 64
    assert second["turns"][-3:] == [("user", "What is the capital of the United States?"),
                                    ("assistant", "Washington, D.C."),
                                    ("user", "List two local attractions.")]
    assert third["turns"][-2] == ("assistant", "The National Mall and the Smithsonian.")
    assert third["temperature"] == 0.0 and third["max_tokens"] <= 32  # select: greedy, short
    meta = state.get_meta_info("answer_1")
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (9, 4)


def test_streaming_and_stop_strings(standin, backend):
    @sgl.function
    async def prog(s):
        s += sgl.user("Count.")
        with s.assistant():
            await s.gen("n", stop="\n\n")

    async def main():
        state = await prog.arun(backend=backend, stream=True)
        return state, [piece async for piece in state.text_async_iter("n")]

    state, pieces = asyncio.run(main())
    assert "".join(pieces) == state["n"] == "one two three" and len(pieces) > 1


def test_images_are_sent(standin, backend):
    @sgl.function
    def image_qa(s):
        s += sgl.user(sgl.image(PNG) + "What is this?")
        s += sgl.assistant(sgl.gen("answer"))

    assert image_qa.run(backend=backend)["answer"] == "A tiny image."
    if isinstance(backend, sgl.VertexAI):
        parts = standin.gemini[0][1]["contents"][0]["parts"]
        inline = parts[0]["inlineData"]  # google-genai writes mime_type in snake case here
        assert inline.get("mimeType", inline.get("mime_type")) == "image/png"
        assert base64.b64decode(inline["data"]) == PNG
        assert parts[1] == {"text": "What is this?"}
    else:
        content = standin.openai[0]["messages"][0]["content"]
        assert content[0]["type"] == "image_url"
        assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_errors_are_clear(standin):
    @sgl.function
    def prog(s):
        s += sgl.user("hi") + sgl.assistant(sgl.gen("x"))

    vertex = sgl.VertexAI("refuse", api_key="vertex-key", base_url=standin.url)
    with pytest.raises(sgl.BackendError, match="model refuse not found") as info:
        prog.run(backend=vertex)
    assert info.value.status == 400
    lite = sgl.LiteLLM("openai/refuse", api_base=standin.url + "/v1", api_key="litellm-key")
    with pytest.raises(sgl.BackendError, match="model refuse not found") as info:
        prog.run(backend=lite)
    assert info.value.status == 404

    @sgl.function
    def prefill(s):
        s += sgl.user("hi")
        s += sgl.assistant("Answer: " + sgl.gen("x"))

    with pytest.raises(sgl.BackendError, match="cannot continue an assistant turn"):
        prefill.run(backend=vertex)
