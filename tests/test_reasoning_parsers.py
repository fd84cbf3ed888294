"""Issue 24, part 2: --reasoning-parser on outputs written in each family's published
format, fed whole and streamed in pieces split at every position (the same reasoning and
content either way), then through /v1/chat/completions with the openai client
(`reasoning_content` in the message and in stream deltas, separate_reasoning,
chat_template_kwargs.enable_thinking, reasoning_effort reaching the template).

vLLM's and SGLang's own parsers do not import on this CPU-only machine (vllm needs a CUDA
build of torch; sglang 0.5.23's srt.parser.reasoning_parser imports srt.utils, which needs
its runtime dependencies, pybase64 first), so there is no differential test here; the
expected splits are written from the formats' documentation.
"""

from __future__ import annotations

import openai
import pytest
from aiohttp.test_utils import TestServer

from asgl.config import ConfigError, EngineConfig
from asgl.server.app import build_app
from asgl.server.reasoning_parsers import make_parser
from compat_fakes import ScriptedEngine

# (parser, model output, expected reasoning, expected content)
CASES = [
    # DeepSeek-R1: the template opens <think> in the prompt; the output closes it
    ("deepseek-r1", "Okay, 2 + 2 is basic arithmetic.\nIt is 4.\n</think>\n\nThe answer is "
     "**4**.", "Okay, 2 + 2 is basic arithmetic.\nIt is 4.", "The answer is **4**."),
    # older R1 checkpoints repeat the <think> themselves
    ("deepseek-r1", "<think>\nShort.\n</think>\n\n4", "Short.", "4"),
    # cut off while thinking: all reasoning
    ("deepseek-r1", "Still thinking about", "Still thinking about", ""),
    # Qwen3 (hybrid): <think> ... </think> then the answer
    ("qwen3", "<think>\nThe user says hello. I should greet back.\n</think>\n\nHello! How can "
     "I help you today?", "The user says hello. I should greet back.",
     "Hello! How can I help you today?"),
    # Qwen3 with thinking off (or a non-thinking answer): all content
    ("qwen3", "Hello! How can I help?", "", "Hello! How can I help?"),
    # Qwen3-*-Thinking-2507: the template opens <think>; the output only closes it
    ("qwen3-thinking", "Let me compute 17 * 3 = 51.\n</think>\n\n51", "Let me compute 17 * 3 "
     "= 51.", "51"),
    # GLM-4.5
    ("glm45", "\n<think>The user wants a haiku.</think>\nLeaves fall, quiet pond", "The user "
     "wants a haiku.", "Leaves fall, quiet pond"),
    # Kimi-VL-Thinking
    ("kimi", "\u25c1think\u25b7Count the apples: 3.\u25c1/think\u25b7There are 3 apples.",
     "Count the apples: 3.", "There are 3 apples."),
    # gpt-oss harmony: analysis channel, then the final channel
    ("gpt-oss", "<|channel|>analysis<|message|>User asks: \"What is 2+2?\" Simple "
     "arithmetic.<|end|><|start|>assistant<|channel|>final<|message|>2 + 2 = 4.",
     "User asks: \"What is 2+2?\" Simple arithmetic.", "2 + 2 = 4."),
    # harmony without an analysis message
    ("gpt-oss", "<|channel|>final<|message|>Hi there.", "", "Hi there."),
]


def _run(name: str, text: str, cuts: list[int]) -> tuple[str, str]:
    parser = make_parser(name)
    reasoning = content = ""
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        r, c = parser.feed(text[a:b])
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return reasoning + r, content + c


@pytest.mark.parametrize("name, text, reasoning, content", CASES)
def test_whole_and_split_at_every_position(name, text, reasoning, content):
    assert _run(name, text, []) == (reasoning, content)
    for cut in range(1, len(text)):
        assert _run(name, text, [cut]) == (reasoning, content), cut
    assert _run(name, text, list(range(1, len(text)))) == (reasoning, content)  # per char


def test_thinking_off_is_all_content():
    assert make_parser("qwen3-thinking", thinking=False) is None
    assert make_parser("qwen3-thinking", thinking=True) is not None


def test_harmony_tool_call_passes_to_content():
    text = ("<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant"
            "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
            "{\"city\": \"Paris\"}")
    reasoning, content = _run("gpt-oss", text, [])
    assert reasoning == "Need the weather tool."
    assert "to=functions.get_weather" in content and content.endswith("{\"city\": \"Paris\"}")
    for cut in range(1, len(text)):
        assert _run("gpt-oss", text, [cut]) == (reasoning, content)


def test_unknown_parser_is_a_config_error_before_loading():
    from asgl.server.launch import preflight

    with pytest.raises(ConfigError, match="--reasoning-parser 'nope'.*qwen3"):
        preflight(EngineConfig(reasoning_parser="nope"), bind=False)
    with pytest.raises(ValueError, match="reasoning-parser"):
        build_app(ScriptedEngine(lambda p: ""), EngineConfig(reasoning_parser="nope"))


# --------------------------------------------------------------------------- over HTTP


async def _client(engine: ScriptedEngine, **cfg):
    server = TestServer(build_app(engine, EngineConfig(**cfg)))
    await server.start_server()
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x",
                                max_retries=0)
    return server, client


MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


@pytest.mark.parametrize("name, text, reasoning, content",
                         [c for c in CASES if c[2] and c[3]])
async def test_chat_reasoning_content(name, text, reasoning, content):
    engine = ScriptedEngine(lambda prompt: text)
    server, client = await _client(engine, reasoning_parser=name)
    try:
        r = await client.chat.completions.create(model="m", messages=MESSAGES)
        msg = r.choices[0].message
        assert msg.content == content and msg.model_extra["reasoning_content"] == reasoning
        stream = await client.chat.completions.create(model="m", messages=MESSAGES,
                                                      stream=True)
        got_r = got_c = ""
        async for chunk in stream:
            for ch in chunk.choices:
                got_r += ch.delta.model_extra.get("reasoning_content") or ""
                got_c += ch.delta.content or ""
        assert (got_r, got_c) == (reasoning, content)
        # separate_reasoning=false (SGLang): the raw output stays in content
        raw = await client.chat.completions.create(model="m", messages=MESSAGES,
                                                   extra_body={"separate_reasoning": False})
        assert "reasoning_content" not in raw.choices[0].message.model_extra or \
            raw.choices[0].message.model_extra["reasoning_content"] is None
        if name != "gpt-oss":  # harmony's markers are special tokens: skipped in raw text
            assert raw.choices[0].message.content == text
        if name == "gpt-oss":  # the parser needs the markers: kept in the engine's text
            assert engine.params[0].skip_special_tokens is False
    finally:
        await client.close()
        await server.close()


async def test_template_variables_and_enable_thinking():
    engine = ScriptedEngine(lambda prompt: "Plain answer.")
    server, client = await _client(engine, reasoning_parser="qwen3-thinking")
    try:
        r = await client.chat.completions.create(
            model="m", messages=MESSAGES, reasoning_effort="high",
            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert "effort=high" in engine.prompts[-1] and "thinking=False" in engine.prompts[-1]
        # thinking off: the qwen3-thinking parser does not claim the output as reasoning
        assert r.choices[0].message.content == "Plain answer."
        assert r.choices[0].message.model_extra["reasoning_content"] is None
        r = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert r.choices[0].message.model_extra["reasoning_content"] == "Plain answer."
        assert r.choices[0].message.content is None
    finally:
        await client.close()
        await server.close()


async def test_extra_message_keys_reach_the_template():
    engine = ScriptedEngine(lambda prompt: "ok")
    server, client = await _client(engine)
    try:
        await client.chat.completions.create(model="m", messages=[
            {"role": "user", "content": "hi", "mood": "cheerful"},
            {"role": "assistant", "content": "yo", "reasoning_content": "greet"},
            {"role": "critic", "content": "be brief"}])
        prompt = engine.prompts[-1]
        assert "<|im_start|>user mood=cheerful\nhi" in prompt
        assert "<|im_start|>assistant reasoning_content=greet" in prompt
        assert "<|im_start|>critic\nbe brief" in prompt
    finally:
        await client.close()
        await server.close()


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _accepts(tokenizer, spec: str, text: str) -> bool:
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer))
    matcher = xgr.GrammarMatcher(compiler.compile_structural_tag(spec))
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return all(matcher.accept_token(t) for t in ids) and matcher.is_terminated()  # complete


@pytest.mark.parametrize("name", ["deepseek-r1", "qwen3"])
async def test_grammar_applies_after_the_reasoning(name):
    opened = name == "qwen3"  # qwen3's output opens <think> itself
    think = ("<think>" if opened else "") + "Let me see: a is 4.</think>\n\n"
    engine = ScriptedEngine(lambda prompt: think + '{"a": 4}')
    engine.supports_grammar = True
    server, client = await _client(engine, reasoning_parser=name)
    try:
        r = await client.chat.completions.create(
            model="m", messages=MESSAGES, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
        assert r.choices[0].message.content == '{"a": 4}'
        sp = engine.params[-1]
        assert sp.json_schema is None and sp.structural_tag is not None
        tok = engine.tokenizer
        assert _accepts(tok, sp.structural_tag, think + '{"a": 4}')  # free thinking, then JSON
        assert not _accepts(tok, sp.structural_tag, think + '{"a": "four"}')  # JSON enforced
        assert _accepts(tok, sp.structural_tag, '{"a": 4}') == opened  # may it skip thinking
        # thinking turned off: the constraint applies from the first token, as before
        await client.chat.completions.create(
            model="m", messages=MESSAGES, response_format={"type": "json_object"},
            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert engine.params[-1].json_schema is not None
    finally:
        await client.close()
        await server.close()


async def test_grammar_with_harmony_is_refused_not_broken():
    engine = ScriptedEngine(lambda prompt: "x")
    engine.supports_grammar = True
    server, client = await _client(engine, reasoning_parser="gpt-oss")
    try:
        with pytest.raises(openai.BadRequestError, match="not supported yet"):
            await client.chat.completions.create(model="m", messages=MESSAGES,
                                                 response_format={"type": "json_object"})
    finally:
        await client.close()
        await server.close()


async def test_reasoning_then_tool_calls():
    """Calls are read from the answer only: a call written inside the thinking is not one."""
    text = ("<think>\nMaybe <tool_call>{\"name\": \"no\", \"arguments\": {}}</tool_call>? "
            "No: call the weather tool.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", "
            "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    engine = ScriptedEngine(lambda prompt: text)
    server, client = await _client(engine, reasoning_parser="qwen3", tool_call_parser="hermes")
    try:
        r = await client.chat.completions.create(model="m", messages=MESSAGES, tools=tools)
        msg = r.choices[0].message
        assert msg.model_extra["reasoning_content"].startswith("Maybe <tool_call>")
        assert [(c.function.name, c.function.arguments) for c in msg.tool_calls] == [
            ("get_weather", '{"city": "Paris"}')]
        assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
        stream = await client.chat.completions.create(model="m", messages=MESSAGES,
                                                      tools=tools, stream=True)
        thought, names = "", []
        async for chunk in stream:
            for ch in chunk.choices:
                thought += ch.delta.model_extra.get("reasoning_content") or ""
                names += [d.function.name for d in ch.delta.tool_calls or [] if d.id]
        assert thought == msg.model_extra["reasoning_content"] and names == ["get_weather"]
    finally:
        await client.close()
        await server.close()
