"""Request limits: no single request can crash the server or hurt another client's request.

Each row of the issue's table gets a regression test against a live `asgl serve`: the request
is a 400 naming the limit (quickly, where it used to take seconds), the server keeps
serving, and a normal greedy request afterwards gives the same output as before. Unit tests
cover the checks themselves (schema depth and finite instances, sampling ranges, the flags)
without a server.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import aiohttp
import pytest

from asgl.config import ConfigError, EngineConfig
from asgl.engine.contracts.errors import InvalidRequest
from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.engine.grammar.specs import (check_finite_instances, check_schema_depth,
                                       normalize_json_schema)
from asgl.server import limits
from asgl.server.errors import ApiError
from asgl.server.metrics import Metrics
from asgl.server.openapi import DocLimits, openapi_document
from asgl.server.state import ServerState
from asgl.server.tokens import TokenTexts
from asgl.server.tool_calls import ToolSetup
from server_fixture import CONTEXT_LEN, ServerProcess, main_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)

RECURSIVE = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
CHAT = [{"role": "user", "content": "Name a color."}]


def nested(levels: int) -> dict:
    """An object schema with `levels` levels of required object properties."""
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


# --------------------------------------------------------------------------- unit: schemas


ACCEPTED = {
    "optional recursive property": {"type": "object", "properties": {"a": {"$ref": "#"}}},
    "anyOf with a terminating branch": {
        "type": "object", "required": ["a"],
        "properties": {"a": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}},
    "array that may be empty": {
        "type": "object", "required": ["a"],
        "properties": {"a": {"type": "array", "items": {"$ref": "#"}}}},
    "nullable type": {"type": ["object", "null"], "properties": {"a": {"$ref": "#"}},
                      "required": ["a"]},
    "linked list in $defs": {
        "$ref": "#/$defs/node", "$defs": {"node": {
            "type": "object", "required": ["value", "next"],
            "properties": {"value": {"type": "integer"},
                           "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}}}},
    "tree": {"$ref": "#/$defs/t", "$defs": {"t": {
        "type": "object", "required": ["kids"],
        "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/t"}}}}}},
    "unused endless definition": {
        "type": "string", "$defs": {"x": {"type": "object", "required": ["a"],
                                          "properties": {"a": {"$ref": "#/$defs/x"}}}}},
}

REFUSED = {
    "required self reference": (RECURSIVE, "#"),
    "untyped object": ({"properties": {"a": {"$ref": "#"}}, "required": ["a"]}, "#"),
    "non-empty array": ({"type": "object", "required": ["a"], "properties": {
        "a": {"type": "array", "items": {"$ref": "#"}, "minItems": 1}}}, "#"),
    "mutual $defs": ({"$ref": "#/$defs/a", "$defs": {
        "a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
        "b": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}},
              "required": ["a"]}}}, "#"),
    # the root is finite ({}), but choosing "a" would force endless text
    "optional property with no finite instance": ({"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"$ref": "#/properties/a"}},
              "required": ["b"]}}}, "#/properties/a"),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_schemas_with_a_finite_instance_are_accepted(name):
    normalize_json_schema(ACCEPTED[name])


@pytest.mark.parametrize("name", REFUSED)
def test_schemas_without_a_finite_instance_are_refused(name):
    schema, path = REFUSED[name]
    with pytest.raises(InvalidRequest, match="no finite instance") as e:
        check_finite_instances(schema, "response_format")
    assert e.value.param == "response_format" and f"at {path}:" in str(e.value)
    with pytest.raises(InvalidRequest, match="no finite instance"):
        normalize_json_schema(schema)


def test_schema_depth_is_checked_without_recursion():
    check_schema_depth(nested(64), "json_schema", 64)
    for levels in (65, 300, 20_000):  # far past the recursion limit
        with pytest.raises(InvalidRequest, match=r"the limit is 64 \(--max-schema-depth\)"):
            normalize_json_schema(nested(levels), "json_schema", 64)
    anyof: dict = {"type": "null"}
    for _ in range(65):
        anyof = {"anyOf": [anyof, {"type": "string"}]}
    with pytest.raises(InvalidRequest, match="nested more than 64"):
        check_schema_depth(anyof, "json_schema", 64)
    deep_value: list = []  # values (default, enum, const) nest too
    value = deep_value
    for _ in range(5000):
        value.append([])
        value = value[0]
    with pytest.raises(InvalidRequest, match="nested more than"):
        normalize_json_schema({"type": "array", "default": deep_value})
    # the engine's own ceiling (128) is safe for the recursive rewrite and xgrammar
    normalize_json_schema(nested(128))


def test_engine_backstop_refuses_endless_schema():
    """The engine's grammar compile (any caller, not only the server) refuses it too, rather
    than building a matcher that follows endless forced text."""
    from asgl.engine.grammar.backend import GrammarBackend
    from asgl.engine.loop.tokenizer import load_tokenizer
    from asgl.models.loader import resolve_model

    backend = GrammarBackend(load_tokenizer(resolve_model(EngineConfig())), 49152, [2])
    try:
        with pytest.raises(InvalidRequest, match="no finite instance"):
            backend.compile_sync("json_schema", json.dumps(RECURSIVE))
        with pytest.raises(InvalidRequest, match="nested more than 128"):
            backend.compile_sync("json_schema", json.dumps(nested(400)))
        backend.compile_sync("json_schema", json.dumps(ACCEPTED["tree"]))
    finally:
        backend.shutdown()


# --------------------------------------------------------------------------- unit: params


@pytest.mark.parametrize("field, value", [
    ("repetition_penalty", 1e-300), ("repetition_penalty", 0.009), ("repetition_penalty", 0.0),
    ("repetition_penalty", float("nan")), ("repetition_penalty", float("inf")),
    ("temperature", float("inf")), ("temperature", float("nan")), ("temperature", -1e-300),
    ("top_p", float("nan")), ("min_p", float("nan")), ("frequency_penalty", float("nan")),
    ("presence_penalty", 3.0), ("logit_bias", {"5": float("nan")}),
    ("logit_bias", {"5": 1e300}),
])
def test_values_that_give_nan_or_inf_are_refused(field, value):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**{field: value}).validate(100)
    assert e.value.param == field


def test_edge_sampling_values_are_accepted():
    SamplingParams(repetition_penalty=0.01, temperature=1e-300, top_p=1e-9, min_p=1.0,
                   logit_bias={"5": -100.0}).validate(100)
    SamplingParams(stop=["x" * 1024] * 64).validate(100)  # the engine's ceilings
    with pytest.raises(InvalidRequest, match="limit is 64"):
        SamplingParams(stop=["x"] * 65).validate(100)
    with pytest.raises(InvalidRequest, match="limit is 1024"):
        SamplingParams(stop="x" * 1025).validate(100)


def test_limit_flags():
    cfg = EngineConfig.from_cli([
        "--max-prompt-chars", "100", "--max-stop-strings", "2", "--max-stop-string-chars",
        "5", "--max-schema-depth", "3", "--max-schema-bytes", "200", "--max-regex-chars",
        "10", "--max-tools", "1"])
    assert (cfg.max_prompt_chars, cfg.max_stop_strings, cfg.max_stop_string_chars,
            cfg.max_schema_depth, cfg.max_schema_bytes, cfg.max_regex_chars,
            cfg.max_tools) == (100, 2, 5, 3, 200, 10, 1)
    defaults = EngineConfig()
    assert (defaults.max_prompt_chars, defaults.max_stop_strings,
            defaults.max_stop_string_chars, defaults.max_schema_depth,
            defaults.max_schema_bytes, defaults.max_regex_chars, defaults.max_tools) == \
        (None, 32, 256, 64, 256 * 1024, 64 * 1024, 128)
    for flag, value in (("max_schema_depth", 129), ("max_stop_strings", 65),
                        ("max_stop_string_chars", 1025), ("max_regex_chars", 1 << 20),
                        ("max_schema_bytes", (1 << 20) + 1), ("max_tools", 0),
                        ("max_prompt_chars", 0)):
        with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')}"):
            EngineConfig(**{flag: value})


def _state(**cfg) -> ServerState:
    engine = SimpleNamespace(context_len=100, vocab_size=50, tokenizer=None,
                             supports_grammar=True, scheduler=SimpleNamespace(waiting=[]))
    return ServerState(engine=engine, config=EngineConfig(**cfg), metrics=Metrics(),
                       model_name="m", token_texts=TokenTexts(None))


def _refused(fn, *args, match: str, **kw) -> ApiError:
    with pytest.raises(ApiError, match=match) as e:
        fn(*args, **kw)
    assert e.value.status == 400
    return e.value


def test_server_limits_follow_the_flags():
    state = _state(max_stop_strings=2, max_stop_string_chars=5, max_schema_depth=3,
                   max_schema_bytes=300, max_regex_chars=10)
    check = limits.check_sampling
    check(state, SamplingParams(stop=["abcde", "x"]))
    _refused(check, state, SamplingParams(stop=["a", "b", "c"]),
             match=r"3 stop strings; the limit is 2 \(--max-stop-strings\)")
    _refused(check, state, SamplingParams(stop="abcdef"), match="--max-stop-string-chars")
    _refused(check, state, SamplingParams(regex="a" * 11), match=r"limit is 10 \(--max-regex")
    e = _refused(check, state, SamplingParams(json_schema=json.dumps(nested(4))),
                 match=r"limit is 3 \(--max-schema-depth\)")
    assert e.param == "json_schema"
    _refused(check, state, SamplingParams(ebnf="root ::= " + '"a" ' * 80),
             match=r"the ebnf has \d+ bytes; the limit is 300 \(--max-schema-bytes\)")
    e = _refused(check, state, SamplingParams(json_schema=json.dumps(RECURSIVE)),
                 schema_param="response_format", match="no finite instance")
    assert e.param == "response_format"
    # max tokens: an explicit value above the context is refused, our defaults are capped
    e = _refused(check, state, SamplingParams(max_new_tokens=2**63),
                 max_tokens_param="max_tokens", match="at most the context length, 100")
    assert e.param == "max_tokens"
    check(state, SamplingParams(max_new_tokens=100), max_tokens_param="max_tokens")
    check(state, SamplingParams(max_new_tokens=128))  # /generate's default
    e = _refused(limits.check_prompt, state, list(range(10)), 91, "max_tokens", "prompt",
                 match="10 prompt tokens \\+ 91")
    assert "100" in e.message
    # prompts: 16 x the context by default, or the flag
    limits.check_prompt_chars(state, 1600, "text")
    _refused(limits.check_prompt_chars, state, 1601, "text",
             match=r"limit is 1600 \(--max-prompt-chars; by default 16 x the context")
    _refused(limits.check_prompt_chars, _state(max_prompt_chars=10), 11, "text",
             match=r"limit is 10 \(--max-prompt-chars\)")


def test_tool_limits():
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string"}}}}}
    cfg = EngineConfig(max_tools=1, max_schema_bytes=400, max_schema_depth=2)
    assert ToolSetup.from_request([tool], None, None, config=cfg) is not None
    tools = [tool, {**tool, "function": {**tool["function"], "name": "g"}}]
    _refused(ToolSetup.from_request, tools, None, None, config=cfg,
             match=r"2 tools; the limit is 1 \(--max-tools\)")
    _refused(ToolSetup.from_request, tools, None, None,
             config=EngineConfig(max_schema_bytes=200),
             match=r"bytes \(as JSON\) in all; the limit is 200 \(--max-schema-bytes\)")
    deep = {**tool, "function": {"name": "f", "parameters": nested(3)}}
    e = _refused(ToolSetup.from_request, [deep], None, None, config=cfg,
                 match="--max-schema-depth")
    assert e.param == "tools[0].function.parameters"


def test_openapi_shows_the_limits():
    plain = openapi_document()["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"type": "number", "minimum": 0.01, "maximum": 2.0} in \
        plain["repetition_penalty"]["anyOf"]
    assert {"type": "integer", "minimum": 1, "maximum": 128} in plain["n"]["anyOf"]
    doc = openapi_document(DocLimits(context_len=1000, max_prompt_chars=16000,
                                     max_stop_strings=3, max_stop_string_chars=7, max_tools=5))
    comps = doc["components"]["schemas"]
    chat = comps["ChatCompletionRequest"]["properties"]
    assert {"type": "integer", "minimum": 0, "maximum": 1000} in chat["max_tokens"]["anyOf"]
    assert {"type": "array", "maxItems": 5} in chat["tools"]["anyOf"]
    stop = {"type": "array", "items": {"type": "string", "maxLength": 7}, "maxItems": 3}
    assert stop in chat["stop"]["anyOf"]
    sp = comps["SamplingParams"]["properties"]
    assert stop in sp["stop"]["anyOf"]
    assert sp["repetition_penalty"]["minimum"] == 0.01
    assert sp["temperature"]["maximum"] == 1e4
    assert {"type": "string", "maxLength": 16000} in \
        comps["GenerateRequest"]["properties"]["text"]["anyOf"]


# --------------------------------------------------------------------------- live server


async def _post(server: ServerProcess, path: str, body, timeout: float = 60.0
                ) -> tuple[int, dict, float]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    start = time.monotonic()
    async with aiohttp.ClientSession() as s:
        async with s.post(server.url + path, data=data,
                          headers={"Content-Type": "application/json"},
                          timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            out = await r.json(content_type=None)
            return r.status, out, time.monotonic() - start


async def _greedy(server: ServerProcess) -> tuple[str, str]:
    status, gen, _ = await _post(server, "/generate", {
        "text": "The capital of France is", "sampling_params": {"max_new_tokens": 8,
                                                               "temperature": 0}})
    assert status == 200, gen
    status, chat, _ = await _post(server, "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 8, "temperature": 0})
    assert status == 200, chat
    return gen["text"], chat["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
async def baseline(main_server) -> tuple[str, str]:
    return await _greedy(main_server)


async def _expect_400(server: ServerProcess, path: str, body, match: str,
                      within: float = 2.0, param: str | None = None) -> dict:
    status, out, elapsed = await _post(server, path, body)
    assert status == 400, (path, out)
    err = out["error"]
    assert err["type"] == "invalid_request_error" and match in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    assert elapsed < within, (elapsed, err)
    return err


async def _still_serving(server: ServerProcess, baseline: tuple[str, str]) -> None:
    assert server.proc.poll() is None, server.log()[-3000:]
    assert await _greedy(server) == baseline


async def test_recursive_schema(main_server, baseline):
    """Used to kill the server after ~30 s (the matcher followed endless forced text)."""
    rf = {"type": "json_schema", "json_schema": {"name": "r", "schema": RECURSIVE}}
    cases = [
        ("/generate", {"text": "hi", "sampling_params": {"json_schema": json.dumps(RECURSIVE)}},
         "json_schema"),
        ("/v1/chat/completions", {"messages": CHAT, "response_format": rf}, "response_format"),
        ("/v1/completions", {"prompt": "hi", "json_schema": RECURSIVE}, "json_schema"),
        ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": RECURSIVE}}]},
         "tools[0].function.parameters"),
    ]
    for path, body, param in cases:
        await _expect_400(main_server, path, body, "no finite instance", param=param)
    # the same shape with a way out still runs
    ok = {"type": "json_schema", "json_schema": {"name": "r", "schema": ACCEPTED[
        "anyOf with a terminating branch"]}}
    status, out, _ = await _post(main_server, "/v1/chat/completions", {
        "messages": CHAT, "response_format": ok, "max_tokens": 8, "temperature": 0})
    assert status == 200, out
    await _still_serving(main_server, baseline)


async def test_huge_prompts(main_server, baseline):
    """A 30 MB prompt used to tokenize for 30 s (6M tokens) before its 400; under load the
    server died. Refused before tokenizing now; so is a token-id prompt, by its length."""
    text = "hello " * 5_000_000  # 30 MB, under the 32 MB body limit
    limit = 16 * CONTEXT_LEN
    for path, body, param in [
            ("/generate", {"text": text}, "text"),
            ("/generate", {"text": ["hi", text]}, "text"),
            ("/v1/completions", {"prompt": text, "max_tokens": 1}, "prompt"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]},
             "messages")]:
        err = await _expect_400(main_server, path, body, "--max-prompt-chars", param=param)
        assert f"the limit is {limit}" in err["message"]
    ids = b'{"input_ids": [' + b"5," * 8_000_000 + b"5]}"
    await _expect_400(main_server, "/generate", ids, f"context length is {CONTEXT_LEN}",
                      param="input_ids")
    ids = b'{"prompt": [' + b"5," * 8_000_000 + b'5], "max_tokens": 1}'
    await _expect_400(main_server, "/v1/completions", ids, f"context length is {CONTEXT_LEN}",
                      param="prompt")
    await _still_serving(main_server, baseline)


async def test_stop_strings(main_server, baseline):
    """64 stop strings of 20,000 characters doubled the time per token."""
    long_stops = ["x%d" % i + "y" * 20_000 for i in range(64)]
    await _expect_400(main_server, "/generate", {"text": "hi", "sampling_params": {
        "max_new_tokens": 64, "stop": long_stops}}, "the limit is 32 (--max-stop-strings)",
        param="stop")
    await _expect_400(main_server, "/generate", {"text": "hi", "sampling_params": {
        "max_new_tokens": 64, "stop": long_stops[:4]}},
        "the limit is 256 (--max-stop-string-chars)", param="stop")
    await _expect_400(main_server, "/v1/completions", {
        "prompt": "hi", "max_tokens": 4, "stop": [f"s{i}" for i in range(33)]},
        "--max-stop-strings", param="stop")
    await _expect_400(main_server, "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 4, "stop": "z" * 257}, "--max-stop-string-chars",
        param="stop")
    # at the limits: accepted
    stops = [chr(65 + i) + "q" * 255 for i in range(32)]
    status, out, _ = await _post(main_server, "/generate", {"text": "hi", "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "stop": stops}})
    assert status == 200, out
    await _still_serving(main_server, baseline)


async def test_nan_sampling_values_do_not_hurt_others(main_server, baseline):
    """repetition_penalty 1e-300 used to fail the step, ending ANOTHER client's request
    with abort "internal error"."""
    other = {"text": "The capital of France is", "sampling_params": {
        "max_new_tokens": 24, "temperature": 0, "ignore_eos": True}}
    bad = [
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 16,
                                                         "repetition_penalty": 1e-300}},
         "repetition_penalty"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 16, "repetition_penalty": 1e-300},
         "repetition_penalty"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 16,
                                  "repetition_penalty": 0.001}, "repetition_penalty"),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": 4, "temperature": 1e999}',
         "temperature"),
        ("/generate", {"text": "hi", "sampling_params": {"temperature": 1e300}}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "logit_bias": {"5": 1e300}},
         "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "frequency_penalty": -1e300},
         "frequency_penalty"),
    ]
    running = asyncio.ensure_future(_post(main_server, "/generate", other))
    for path, body, param in bad:
        await _expect_400(main_server, path, body, "", param=param)
    status, out, _ = await running
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "length", out
    assert out["text"].startswith(baseline[0])
    # a tiny positive temperature is floored in the sampler: accepted, finite
    status, out, _ = await _post(main_server, "/generate", {"text": "hi", "sampling_params": {
        "max_new_tokens": 4, "temperature": 1e-300, "repetition_penalty": 0.01}})
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "length", out
    await _still_serving(main_server, baseline)


async def test_deep_schemas(main_server, baseline):
    """Schemas nested 300 or 400 levels used to be a 500 (RecursionError)."""
    for levels in (300, 400):
        schema = nested(levels)
        rf = {"type": "json_schema", "json_schema": {"name": "d", "schema": schema}}
        for path, body, param in [
                ("/v1/chat/completions", {"messages": CHAT, "response_format": rf},
                 "response_format"),
                ("/v1/chat/completions", {"messages": CHAT, "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": schema}}]},
                 "tools[0].function.parameters"),
                ("/v1/completions", {"prompt": "hi", "json_schema": schema}, "json_schema"),
                ("/v1/completions", {"prompt": "hi", "json_schema": json.dumps(schema)},
                 "json_schema"),
                ("/generate", {"text": "hi", "sampling_params": {
                    "json_schema": json.dumps(schema)}}, "json_schema")]:
            await _expect_400(main_server, path, body, "the limit is 64 (--max-schema-depth)",
                              param=param)
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"}
                                             for i in range(100_000)}}  # ~2.5 MB
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": wide}}
    await _expect_400(main_server, "/v1/chat/completions", {"messages": CHAT,
                                                            "response_format": rf},
                      "the limit is 262144 (--max-schema-bytes)", param="response_format")
    await _expect_400(main_server, "/v1/chat/completions", {"messages": CHAT, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": wide}}]},
        "the limit is 262144 (--max-schema-bytes)", param="tools")
    await _expect_400(main_server, "/generate", {"text": "hi", "sampling_params": {
        "json_schema": json.dumps(wide)}}, "the limit is 262144 (--max-schema-bytes)",
        param="json_schema")
    await _expect_400(main_server, "/generate", {"text": "hi", "sampling_params": {
        "regex": "a" * 70_000}}, "the limit is 65536 (--max-regex-chars)", param="regex")
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    await _expect_400(main_server, "/v1/chat/completions", {"messages": CHAT, "tools": tools},
                      "the limit is 128 (--max-tools)", param="tools")
    await _still_serving(main_server, baseline)


@pytest.mark.parametrize("raw", ["9223372036854775808", "18446744073709551616", "1e23",
                                 "2147483648", str(CONTEXT_LEN + 1)])
async def test_huge_max_tokens(main_server, baseline, raw):
    """2^63, 2^64 and 1e23 used to be accepted and run until the client gave up."""
    limit = f"{CONTEXT_LEN}"
    for path, field, body in [
            ("/v1/completions", "max_tokens", '{"prompt": "hi", "max_tokens": %s}'),
            ("/v1/chat/completions", "max_completion_tokens",
             '{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": %s}'),
            ("/v1/chat/completions", "max_tokens",
             '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}'),
            ("/generate", "max_new_tokens",
             '{"text": "hi", "sampling_params": {"max_new_tokens": %s}}')]:
        err = await _expect_400(main_server, path, (body % raw).encode(), limit, within=5.0)
        assert field in err["message"] and "context length" in err["message"], err
    # prompt + max_tokens over the context: both numbers named
    err = await _expect_400(main_server, "/v1/completions", {
        "prompt": [5] * 100, "max_tokens": CONTEXT_LEN - 50}, "100 prompt tokens",
        param="max_tokens")
    assert f"{CONTEXT_LEN - 50} requested" in err["message"]
    await _still_serving(main_server, baseline)


async def test_server_is_clean_after_all(main_server, baseline):
    await _still_serving(main_server, baseline)
    main_server.assert_no_leak()
    main_server.assert_clean_log()
