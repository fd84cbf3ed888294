"""Issue 24, part 4: the Responses API with the official client (`client.responses`):
plain, streamed, with a function tool and with previous_response_id; GET and DELETE of a
stored response. A scripted engine (compat_fakes.py) shows exactly what reached the
model; the live embedded model checks that a response equals the chat completion of the
same conversation (one path for both routes).
"""

from __future__ import annotations

import json

import openai
import pytest
from aiohttp.test_utils import TestServer

from asgl.config import EngineConfig
from asgl.server.app import build_app
from compat_fakes import ScriptedEngine
from server_fixture import ServerProcess, main_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)


async def _serve(script, **cfg):
    engine = ScriptedEngine(script)
    server = TestServer(build_app(engine, EngineConfig(**cfg)))
    await server.start_server()
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x",
                                max_retries=0)
    return engine, server, client


async def test_plain_get_delete():
    engine, server, client = await _serve(lambda p: "Paris is the capital of France.")
    try:
        r = await client.responses.create(model="m", input="Capital of France?",
                                          instructions="Answer in one sentence.")
        assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
        assert r.output_text == "Paris is the capital of France."
        assert r.output[0].type == "message" and r.output[0].role == "assistant"
        assert r.usage.output_tokens == len("Paris is the capital of France.")  # byte tokens
        assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
        prompt = engine.prompts[-1]
        assert "<|im_start|>system\nAnswer in one sentence.<|im_end|>" in prompt
        assert "<|im_start|>user\nCapital of France?<|im_end|>" in prompt
        got = await client.responses.retrieve(r.id)
        assert got.output_text == r.output_text and got.id == r.id
        await client.responses.delete(r.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(r.id)
        unstored = await client.responses.create(model="m", input="x", store=False)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(unstored.id)
    finally:
        await client.close()
        await server.close()


async def test_streamed_events():
    text = "Streaming works, byte by byte."
    engine, server, client = await _serve(lambda p: text)
    try:
        stream = await client.responses.create(model="m", input="go", stream=True)
        events = [e async for e in stream]
        types = [e.type for e in events]
        assert types[0] == "response.created" and types[-1] == "response.completed"
        assert "response.output_item.added" in types and "response.output_text.done" in types
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert "".join(deltas) == text and len(deltas) > 1
        assert [e.sequence_number for e in events] == list(range(len(events)))
        final = events[-1].response
        assert final.output_text == text and final.status == "completed"
        assert (await client.responses.retrieve(final.id)).output_text == text
    finally:
        await client.close()
        await server.close()


TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


async def test_function_tool_and_previous_response_id():
    answers = iter([CALL, "It is sunny in Paris."])
    engine, server, client = await _serve(lambda p: next(answers))
    try:
        r = await client.responses.create(model="m", input="Weather in Paris?", tools=[TOOL])
        calls = [o for o in r.output if o.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "get_weather"
        assert json.loads(calls[0].arguments) == {"city": "Paris"}
        follow = await client.responses.create(
            model="m", previous_response_id=r.id, tools=[TOOL],
            input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                    "output": "sunny, 21 C"}])
        assert follow.output_text == "It is sunny in Paris."
        assert follow.previous_response_id == r.id
        prompt = engine.prompts[-1]  # the whole conversation reached the model
        assert "Weather in Paris?" in prompt and "get_weather" in prompt
        assert "sunny, 21 C" in prompt
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model="m", input="x", previous_response_id="resp_no")
    finally:
        await client.close()
        await server.close()


async def test_streamed_function_call():
    engine, server, client = await _serve(lambda p: CALL)
    try:
        stream = await client.responses.create(model="m", input="Weather?", tools=[TOOL],
                                               stream=True)
        events = [e async for e in stream]
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}
        final = events[-1].response
        assert [o.type for o in final.output] == ["function_call"]
    finally:
        await client.close()
        await server.close()


async def test_reasoning_item_and_unknown_fields():
    engine, server, client = await _serve(lambda p: "<think>2+2=4</think>4",
                                          reasoning_parser="qwen3")
    try:
        r = await client.responses.create(model="m", input="2+2?",
                                          reasoning={"effort": "low"})
        assert [o.type for o in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == "2+2=4" and r.output_text == "4"
        assert "effort=low" in engine.prompts[-1]  # reasoning.effort reached the template
        with pytest.raises(openai.BadRequestError, match="bogus"):
            await client.responses.create(model="m", input="x", extra_body={"bogus": 1})
    finally:
        await client.close()
        await server.close()


def test_live_response_equals_chat(main_server: ServerProcess):
    client = openai.OpenAI(base_url=main_server.base_url, api_key="EMPTY", max_retries=0)
    messages = [{"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(model="default", messages=messages, max_tokens=8,
                                          temperature=0)
    r = client.responses.create(model="default", input="Name a color.", max_output_tokens=8,
                                temperature=0)
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length"
                        else "completed")
    stream = client.responses.create(model="default", input="Name a color.",
                                     max_output_tokens=8, temperature=0, stream=True)
    text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    assert text == r.output_text
    again = client.responses.create(model="default", previous_response_id=r.id,
                                    input="Another one?", max_output_tokens=4, temperature=0)
    assert again.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens


async def test_text_format_and_instructions_per_turn():
    engine, server, client = await _serve(lambda p: '{"city": "Paris"}')
    engine.supports_grammar = True
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    try:
        r = await client.responses.create(
            model="m", input="Where?", instructions="Answer in JSON.",
            text={"format": {"type": "json_schema", "name": "place", "schema": schema}})
        assert json.loads(engine.params[-1].json_schema) == schema  # the grammar it asked for
        assert r.output_text == '{"city": "Paris"}'
        await client.responses.create(model="m", input="And then?", previous_response_id=r.id)
        prompt = engine.prompts[-1]
        assert "Where?" in prompt and '{"city": "Paris"}' in prompt and "And then?" in prompt
        assert "Answer in JSON." not in prompt  # instructions are not carried over
    finally:
        await client.close()
        await server.close()


async def test_bad_items_are_400_not_500():
    engine, server, client = await _serve(lambda p: "x")
    try:
        for body in ({"input": [{"role": 5, "content": "hi"}]},
                     {"input": [{"type": "function_call_output", "call_id": "c"}]},
                     {"input": [{"type": "image", "url": "x"}]},
                     {"input": "hi", "tools": [{"type": "web_search"}]},
                     {"input": "hi", "background": True}):
            with pytest.raises(openai.BadRequestError):
                await client.responses.create(model="m", **body)
    finally:
        await client.close()
        await server.close()
