"""Structured generation on a live `asgl serve`: regex / json_schema through the native and
OpenAI APIs (streamed and not), response_format, tool calls (required, named, parallel,
streamed: argument deltas concatenate to the final arguments), and bad grammars fuzzed
against the server (always a 400, never a crash; the grammar cache stays bounded)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grammar_strategies import (CHARACTER_PROMPT, CHARACTER_REGEX, IP_REGEX, full_match,
                                json_schemas, regexes, validates)
from server_fixture import ServerProcess, main_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 24},
            "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
            "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
            "required": ["a", "b"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 17 + 25?"}]


# --------------------------------------------------------------------------- HTTP helpers


async def post(session: aiohttp.ClientSession, server: ServerProcess, path: str,
               body: dict) -> tuple[int, dict]:
    async with session.post(server.url + path, json=body) as r:
        return r.status, await r.json(content_type=None)


async def stream(session: aiohttp.ClientSession, server: ServerProcess, path: str,
                 body: dict) -> list[dict]:
    events = []
    async with session.post(server.url + path, json={**body, "stream": True}) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


async def native(session, server, text: str, sp: dict, streamed: bool) -> tuple[str, str]:
    """(text, finish reason type) from /generate."""
    body = {"text": text, "sampling_params": sp}
    if streamed:
        events = await stream(session, server, "/generate", body)
        last = events[-1]  # native events carry the text so far
        return last["text"], last["meta_info"]["finish_reason"]["type"]
    status, out = await post(session, server, "/generate", body)
    assert status == 200, out
    return out["text"], out["meta_info"]["finish_reason"]["type"]


async def chat(session, server, body: dict, streamed: bool) -> dict:
    """A chat completion's first choice as {"content", "tool_calls", "finish_reason"},
    assembled from deltas when streamed (checking OpenAI's delta rules on the way)."""
    body = {"model": "default", **body}
    if not streamed:
        status, out = await post(session, server, "/v1/chat/completions", body)
        assert status == 200, out
        choice = out["choices"][0]
        return {"content": choice["message"]["content"],
                "tool_calls": choice["message"].get("tool_calls"),
                "finish_reason": choice["finish_reason"]}
    content, calls, reason = [], {}, None
    for event in await stream(session, server, "/v1/chat/completions", body):
        for c in event["choices"]:
            delta = c["delta"]
            content.append(delta.get("content") or "")
            for d in delta.get("tool_calls") or []:
                if "id" in d:  # a call's first delta: exactly once per index
                    assert d["index"] not in calls and d["type"] == "function"
                    calls[d["index"]] = {"id": d["id"], "type": "function", "function": {
                        "name": d["function"]["name"], "arguments": ""}}
                calls[d["index"]]["function"]["arguments"] += d["function"].get("arguments", "")
            reason = c["finish_reason"] or reason
    return {"content": "".join(content) or None,
            "tool_calls": [calls[i] for i in sorted(calls)] or None, "finish_reason": reason}


async def completion(session, server, prompt: str, extra: dict, streamed: bool
                     ) -> tuple[str, str]:
    body = {"model": "default", "prompt": prompt, **extra}
    if streamed:
        events = await stream(session, server, "/v1/completions", body)
        text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
        return text, [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
    status, out = await post(session, server, "/v1/completions", body)
    assert status == 200, out
    return out["choices"][0]["text"], out["choices"][0]["finish_reason"]


def run(coro_fn):
    async def main():
        async with aiohttp.ClientSession() as session:
            return await coro_fn(session)
    return asyncio.run(main())


# --------------------------------------------------------------------------- tests


def test_readme_regexes_native(main_server):
    async def go(session):
        ip_prompt = "Q: What is the IP address of the Google DNS servers?\nA: "
        return await asyncio.gather(
            native(session, main_server, ip_prompt,
                   {"regex": IP_REGEX, "temperature": 0, "max_new_tokens": 32}, False),
            *(native(session, main_server, CHARACTER_PROMPT.format(name),
                     {"regex": CHARACTER_REGEX, "temperature": 0, "max_new_tokens": 256},
                     streamed)
              for name, streamed in (("Harry Potter", False), ("Ginny Weasley", True))))
    (ip, reason), *characters = run(go)
    assert full_match(ip, IP_REGEX) and reason == "stop", ip
    for text, reason in characters:
        assert full_match(text, CHARACTER_REGEX) and reason == "stop", text


@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(schemas=st.lists(json_schemas(max_leaves=4), min_size=8, max_size=8),
       patterns=st.lists(regexes(), min_size=8, max_size=8), seed=st.integers(0, 10**6))
def test_random_grammars_through_both_apis(main_server, schemas, patterns, seed):
    """Temperature 1.0; each grammar through one of native / OpenAI, streamed or not."""
    async def one_schema(session, i, schema):
        sp = {"temperature": 1.0, "seed": seed + i, "max_new_tokens": 160}
        streamed = i % 2 == 1
        if i % 4 < 2:
            return await native(session, main_server, "Answer with JSON:\n",
                                {**sp, "json_schema": json.dumps(schema)}, streamed)
        out = await chat(session, main_server, {
            "messages": [{"role": "user", "content": "Answer with a JSON object."}],
            "temperature": 1.0, "seed": seed + i, "max_tokens": 160,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "answer", "schema": schema}}},
            streamed)
        return out["content"] or "", out["finish_reason"]

    async def one_regex(session, i, regex):
        streamed = i % 2 == 1
        if i % 4 < 2:
            return await native(session, main_server, "Text: ", {
                "temperature": 1.0, "seed": seed + i, "max_new_tokens": 48, "regex": regex},
                streamed)
        return await completion(session, main_server, "Text: ", {
            "temperature": 1.0, "seed": seed + i, "max_tokens": 48, "regex": regex}, streamed)

    async def go(session):
        return await asyncio.gather(*(one_schema(session, i, s) for i, s in enumerate(schemas)),
                                    *(one_regex(session, i, r) for i, r in enumerate(patterns)))

    outs = run(go)
    stopped = 0
    for (text, reason), spec in zip(outs, schemas + patterns):
        if reason != "stop":
            assert reason == "length", reason
            continue
        stopped += 1
        ok = validates(text, spec) if isinstance(spec, dict) else full_match(text, spec)
        assert ok, (text, spec)
    assert stopped >= 0.7 * len(outs)


def _check_calls(result: dict, names: set[str], count: tuple[int, int]) -> None:
    calls = result["tool_calls"]
    assert calls and count[0] <= len(calls) <= count[1], result
    for call in calls:
        name = call["function"]["name"]
        assert name in names and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


def test_tool_calls_required_and_named(main_server):
    named = {"type": "function", "function": {"name": "add"}}
    cases = [  # (tool_choice, parallel_tool_calls, allowed names, call count, finish)
        ("required", None, {"get_weather", "add"}, (1, 8), "tool_calls"),
        ("required", False, {"get_weather", "add"}, (1, 1), "tool_calls"),
        (named, None, {"add"}, (1, 1), "stop"),
    ]

    async def go(session):
        jobs = []
        for choice, parallel, *_ in cases:
            body = {"messages": ASK, "tools": TOOLS, "tool_choice": choice,
                    "temperature": 0, "max_tokens": 160}
            if parallel is not None:
                body["parallel_tool_calls"] = parallel
            jobs += [chat(session, main_server, body, False),
                     chat(session, main_server, body, True),
                     chat(session, main_server, {**body, "temperature": 1.0, "seed": 11},
                          True)]
        return await asyncio.gather(*jobs)

    results = run(go)
    for k, (_, _, names, count, finish) in enumerate(cases):
        whole, streamed, sampled = results[3 * k:3 * k + 3]
        for r in (whole, streamed, sampled):
            _check_calls(r, names, count)
            assert r["finish_reason"] == finish and r["content"] is None, r
        # greedy: the stream's deltas rebuild exactly the non-streamed calls
        strip = [(c["function"]["name"], c["function"]["arguments"])
                 for c in whole["tool_calls"]]
        assert strip == [(c["function"]["name"], c["function"]["arguments"])
                         for c in streamed["tool_calls"]]
    # parallel calls happen (greedy, this prompt asks for two things)
    assert len(results[0]["tool_calls"]) >= 2


def test_tool_history_and_auto(main_server):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 17, "b": 25}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}]

    async def go(session):
        return await asyncio.gather(
            chat(session, main_server, {"messages": history, "tools": TOOLS,
                                        "temperature": 0, "max_tokens": 24}, False),
            chat(session, main_server, {"messages": history, "tools": TOOLS,
                                        "tool_choice": "none", "temperature": 0,
                                        "max_tokens": 24}, True))
    auto, none = run(go)
    assert auto["content"] or auto["tool_calls"]
    assert none["tool_calls"] is None and none["content"]


def test_response_format_json_object_and_completions(main_server):
    schema = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                                                      "maximum": 9}}, "required": ["x"]}

    async def go(session):
        return await asyncio.gather(
            chat(session, main_server, {
                "messages": [{"role": "user", "content": "Give me a small JSON object."}],
                "response_format": {"type": "json_object"}, "temperature": 0,
                "max_tokens": 64}, True),
            completion(session, main_server, "JSON: ", {
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "x", "schema": schema}},
                "temperature": 0, "max_tokens": 16}, False),
            completion(session, main_server, "JSON: ", {
                "json_schema": json.dumps(schema), "temperature": 0, "max_tokens": 16}, True))
    obj, (text_a, _), (text_b, _) = run(go)
    if obj["finish_reason"] == "stop":
        assert isinstance(json.loads(obj["content"]), dict)
    assert validates(text_a, schema) and text_a == text_b


_BAD = [
    {"regex": "(unclosed"}, {"regex": r"(a)\1"}, {"regex": "a{3,1}"}, {"regex": "[z-a]"},
    {"ebnf": "root ::= missing"}, {"ebnf": "::="},
    {"json_schema": "{oops"}, {"json_schema": "[]"}, {"json_schema": '{"type": "blob"}'},
    {"json_schema": '{"type": "array", "uniqueItems": true}'},
    {"json_schema": '{"oneOf": [{"type": "integer"}, {"type": "number"}]}'},
    {"json_schema": '{"type": "string", "pattern": "^a+$", "maxLength": 2}'},
    {"json_schema": '{"$ref": "https://example.com/schema.json"}'},
    {"structural_tag": '{"type": "structural_tag"}'},
    {"regex": "a", "json_schema": "{}"},
]


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(junk=st.lists(st.tuples(st.sampled_from(["regex", "json_schema", "ebnf"]),
                               st.text(max_size=30)), min_size=10, max_size=10))
def test_fuzzed_grammars_are_400s_never_crashes(main_server, junk):
    bodies = [{"text": "x", "sampling_params": {k: v, "max_new_tokens": 2}} for k, v in junk]

    async def go(session):
        return await asyncio.gather(*(post(session, main_server, "/generate", b)
                                      for b in bodies))
    for (status, body), sent in zip(run(go), bodies):
        assert status in (200, 400), (status, body, sent)


def test_bad_grammars_are_400s_and_the_cache_stays_bounded(main_server):
    bodies = [{"text": "x", "sampling_params": {**b, "max_new_tokens": 2}} for b in _BAD]
    # distinct invalid regexes fill the cache with refusals (cheap: nothing generates)
    bodies += [{"text": "x", "sampling_params": {"regex": f"(bad{i}", "max_new_tokens": 2}}
               for i in range(300)]

    async def go(session):
        sem = asyncio.Semaphore(32)

        async def one(body):
            async with sem:
                return await post(session, main_server, "/generate", body)
        out = await asyncio.gather(*(one(b) for b in bodies))
        bad_chat = await post(session, main_server, "/v1/chat/completions", {
            "model": "default", "messages": ASK, "max_tokens": 2,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "object", "not": {}}}}})
        bad_tool = await post(session, main_server, "/v1/chat/completions", {
            "model": "default", "messages": ASK, "max_tokens": 2, "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "nope"}}})
        return out + [bad_chat, bad_tool]

    for status, body in run(go):
        assert status == 400 and body["error"]["message"], body
    info = main_server.get_json("/get_server_info")["grammar_cache"]
    assert info["entries"] == info["max_entries"]  # 300+ distinct specs: it evicted
    assert info["bytes"] <= info["max_bytes"]
    main_server.assert_clean_log()
    main_server.assert_no_leak()
