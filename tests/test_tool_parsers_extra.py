"""Issue 24, part 3: the tool-call parsers beside hermes and llama3, on outputs written in
each family's published format (from the model cards' and chat templates' examples), fed
whole and split at every position (the same content and calls either way), then streamed
through /v1/chat/completions with the openai client; an unknown --tool-call-parser is a
start-up error before any model loads.

vLLM's and SGLang's parsers do not import on this CPU-only machine (vllm needs a CUDA
torch; sglang 0.5.23's srt modules need its runtime dependencies, pybase64 first), so
there is no differential test against them here.
"""

from __future__ import annotations

import json

import openai
import pytest
from aiohttp.test_utils import TestServer

from asgl.config import ConfigError, EngineConfig
from asgl.server.app import build_app
from asgl.server.tool_calls import ToolSetup, get_format
from compat_fakes import ScriptedEngine

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "metric": {"type": "boolean"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
DS = {"B": "<\uff5ctool\u2581calls\u2581begin\uff5c>",
      "E": "<\uff5ctool\u2581calls\u2581end\uff5c>",
      "b": "<\uff5ctool\u2581call\u2581begin\uff5c>", "e": "<\uff5ctool\u2581call\u2581end\uff5c>",
      "s": "<\uff5ctool\u2581sep\uff5c>"}

PARIS = ("get_weather", {"city": "Paris", "days": 3})
UTC = ("get_time", {"tz": "UTC"})

# (parser, output, expected content, expected calls)
CASES = [
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
     '"days": 3}}, {"name": "get_time", "arguments": {"tz": "UTC"}}]', "", [PARIS, UTC]),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}'
     '[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}', "Sure.", [PARIS, UTC]),
    ("mistral", "No tools needed: it is sunny.", "No tools needed: it is sunny.", []),
    ("qwen3_coder", "I'll check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis"
     "\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n"
     "<tool_call>\n<function=get_time>\n<parameter=tz>\nUTC\n</parameter>\n</function>\n"
     "</tool_call>", "I'll check.", [PARIS, UTC]),
    ("deepseekv3", "Let me look." + DS["B"] + DS["b"] + "function" + DS["s"] + "get_weather\n"
     "```json\n{\"city\": \"Paris\", \"days\": 3}\n```" + DS["e"] + "\n" + DS["b"] + "function"
     + DS["s"] + "get_time\n```json\n{\"tz\": \"UTC\"}\n```" + DS["e"] + DS["E"],
     "Let me look.", [PARIS, UTC]),
    ("deepseekv31", DS["B"] + DS["b"] + "get_weather" + DS["s"] + '{"city": "Paris", "days": 3}'
     + DS["e"] + DS["b"] + "get_time" + DS["s"] + '{"tz": "UTC"}' + DS["e"] + DS["E"], "",
     [PARIS, UTC]),
    ("kimi_k2", "Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
     "<|tool_call_argument_begin|>{\"city\": \"Paris\", \"days\": 3}<|tool_call_end|>"
     "<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{\"tz\": \"UTC\"}"
     "<|tool_call_end|><|tool_calls_section_end|>", "Checking.", [PARIS, UTC]),
    ("glm45", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
     "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n<tool_call>get_time\n"
     "<arg_key>tz</arg_key>\n<arg_value>UTC</arg_value>\n</tool_call>", "", [PARIS, UTC]),
    ("pythonic", '[get_weather(city="Paris", days=3), get_time(tz="UTC")]', "", [PARIS, UTC]),
    ("pythonic", "<|python_start|>[get_time(tz='UTC')]<|python_end|>", "", [UTC]),
    ("pythonic", "The weather is [unknown].", "The weather is [unknown].", []),
    ("gpt-oss", "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant"
     "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
     "{\"city\": \"Paris\", \"days\": 3}", "", [PARIS]),
    ("gpt-oss", "<|channel|>final<|message|>It is sunny.", "It is sunny.", []),
]


def _parse(name: str, text: str, cuts: list[int]):
    setup = ToolSetup.from_request(TOOLS, None, None)
    parser = get_format(name).parser(setup.tools)
    content, deltas = "", []
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        c, d = parser.feed(text[a:b])
        content, deltas = content + c, deltas + d
    c, d = parser.finish()
    content, deltas = content + c, deltas + d
    calls: dict[int, list] = {}
    for delta in deltas:  # as a client assembles them
        if delta.id is not None:
            calls[delta.index] = [delta.name, ""]
        calls[delta.index][1] += delta.arguments
    return content, [(n, json.loads(a)) for n, a in calls.values()]


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_whole_and_split_at_every_position(name, text, content, calls):
    expected = (content, [(n, a) for n, a in calls])
    assert _parse(name, text, []) == expected
    for cut in range(1, len(text)):
        assert _parse(name, text, [cut]) == expected, cut
    assert _parse(name, text, list(range(1, len(text)))) == expected


def test_typed_xml_values_follow_the_schema():
    text = ("<tool_call>\n<function=get_weather>\n<parameter=city>\n123\n</parameter>\n"
            "<parameter=metric>\ntrue\n</parameter>\n</function>\n</tool_call>")
    assert _parse("qwen3_coder", text, [])[1] == [("get_weather", {"city": "123",
                                                                    "metric": True})]


def test_unknown_parser_fails_before_the_model_loads():
    from asgl.server.launch import preflight

    with pytest.raises(ConfigError, match="unknown --tool-call-parser 'nope'.*kimi_k2"):
        preflight(EngineConfig(tool_call_parser="nope"), bind=False)
    for name in ("mistral", "qwen3_coder", "deepseekv3", "deepseekv31", "pythonic",
                 "gpt-oss", "openai", "kimi_k2", "glm45", "qwen25"):
        preflight(EngineConfig(tool_call_parser=name), bind=False)  # known: no error


async def _serve(text: str, parser: str):
    engine = ScriptedEngine(lambda prompt: text)
    server = TestServer(build_app(engine, EngineConfig(tool_call_parser=parser)))
    await server.start_server()
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x",
                                max_retries=0)
    return engine, server, client


MESSAGES = [{"role": "user", "content": "Weather in Paris for 3 days, and the time?"}]


@pytest.mark.parametrize("name, text, content, calls", [c for c in CASES if c[3]])
async def test_chat_tool_calls_streamed_and_not(name, text, content, calls):
    engine, server, client = await _serve(text, name)
    try:
        r = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments))
                for c in choice.message.tool_calls] == calls
        assert (choice.message.content or "") == content
        stream = await client.chat.completions.create(model="m", messages=MESSAGES,
                                                      tools=TOOLS, stream=True)
        got: dict[int, list] = {}
        text_out, reason = "", None
        async for chunk in stream:
            for ch in chunk.choices:
                text_out += ch.delta.content or ""
                for d in ch.delta.tool_calls or []:
                    if d.id:
                        got[d.index] = [d.function.name, ""]
                    got[d.index][1] += d.function.arguments or ""
                reason = ch.finish_reason or reason
        assert reason == "tool_calls" and text_out == content
        assert [(n, json.loads(a)) for n, a in got.values()] == calls
        if name in ("mistral", "gpt-oss"):  # markers that are special tokens are kept
            assert engine.params[-1].skip_special_tokens is False
    finally:
        await client.close()
        await server.close()


async def test_constrained_choice_refused_for_xml_formats():
    engine, server, client = await _serve("x", "qwen3_coder")
    try:
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS,
                                                 tool_choice="required")
    finally:
        await client.close()
        await server.close()
