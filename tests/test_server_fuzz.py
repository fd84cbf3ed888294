"""Fuzzing a live `asgl serve`: hypothesis bodies generated from the server's own OpenAPI
description (mostly well-typed, some values and whole bodies replaced by arbitrary JSON),
plus hand-picked killers. Every answer must be a 200 or a clean 4xx with an error body
(never a 500; no 503, since this server has no queue limit); the server keeps serving; and
afterwards the KV pool is fully free.

Generation is kept cheap: fields that cost decode steps (max tokens, min tokens) are drawn
from small values, and each hypothesis example sends a batch of bodies concurrently.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_fixture import CONTEXT_LEN, ServerProcess, main_server  # noqa: F401

pytestmark = pytest.mark.timeout(600)

ROUTES = ["/generate", "/v1/completions", "/v1/chat/completions"]
OK_STATUSES = {200, 400, 413}
COST_KEYS = {"max_tokens", "max_new_tokens", "max_completion_tokens"}

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8)
_ints = st.sampled_from([-1, 0, 1, 2, 3, 20, 21, 2**31, 2**63, 10**30, -(10**30)]) | \
    st.integers(-3, 40)
_floats = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 1e9, -1e300, 1e300])
_ids = st.lists(st.sampled_from([0, 1, 2, 500, 49151, 49152, -1, 10**9]) | st.integers(3, 49000),
                min_size=0, max_size=6)

# fields whose meaning needs values from a narrow set to get past the first check
_SPECIAL: dict[str, st.SearchStrategy] = {
    "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "bogus"]),
    "type": st.sampled_from(["text", "image_url", "json_object"]),
    "input_ids": st.one_of(_ids, st.lists(_ids, max_size=3)),
    "prompt": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=10), max_size=3), _ids,
                        st.lists(_ids, max_size=3)),
    "n": st.sampled_from([-1, 0, 1, 2, 129, 5000000]),
    "min_tokens": st.sampled_from([-1, 0, 1, 2, CONTEXT_LEN + 1]),
    "min_new_tokens": st.sampled_from([-1, 0, 1, 2, CONTEXT_LEN + 1]),
    "regex": st.sampled_from(["[a-z ]+", "(", "\\d+"]),
    "ebnf": st.sampled_from(['root ::= "yes" | "no"', "root ::= ("]),
    "json_schema": st.sampled_from(['{"type": "string"}', "{not json"]),
    "seed": st.sampled_from([None, 0, 1, -1, 2**64, 2**70]),
    "rid": st.none() | st.text(min_size=1, max_size=6),
}
for _k in COST_KEYS:
    _SPECIAL[_k] = st.sampled_from([-1, 0, 1, 2, 4, "4", 4.0])


def strategy(schema: dict, comps: dict, key: str | None = None, depth: int = 0):
    """A hypothesis strategy for a JSON schema (the subset msgspec emits)."""
    if key in _SPECIAL:
        return _SPECIAL[key]
    if "$ref" in schema:
        return strategy(comps[schema["$ref"].rsplit("/", 1)[1]], comps, key, depth)
    if "anyOf" in schema:
        return st.one_of([strategy(s, comps, key, depth) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        if depth > 3:
            return st.just({})
        props = {k: strategy(v, comps, k, depth + 1) for k, v in schema["properties"].items()}
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                     optional={k: v for k, v in props.items()
                                               if k not in required})
    if kind == "object":
        return st.dictionaries(st.text(max_size=5), _json, max_size=2)
    if kind == "array":
        return st.lists(strategy(schema.get("items", {}), comps, key, depth + 1), max_size=3)
    if kind == "string":
        return st.text(max_size=12)
    if kind == "integer":
        return _ints
    if kind == "number":
        return _floats
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return _json


def bound_cost(body: Any, route: str) -> Any:
    """Every request that could run asks for at most a few tokens: where the client's
    max-tokens field is absent or null, set it (a missing one means "up to the context")."""
    if not isinstance(body, dict):
        return body
    if route == "/generate":
        sps = body.get("sampling_params")
        for sp in (sps if isinstance(sps, list) else [sps]):
            if isinstance(sp, dict) and sp.get("max_new_tokens") is None:
                sp["max_new_tokens"] = 3
        if sps is None:
            body["sampling_params"] = {"max_new_tokens": 3}
    elif body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 3
    return body



async def send(server: ServerProcess, route: str, body: bytes) -> tuple[int, bytes, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(server.url + route, data=body,
                          headers={"Content-Type": "application/json"},
                          timeout=aiohttp.ClientTimeout(total=120)) as r:
            return r.status, await r.read(), dict(r.headers)


def check_answer(route: str, body: bytes, status: int, data: bytes, headers: dict) -> None:
    where = f"{route} {body[:300]!r} -> {status} {data[:300]!r}"
    assert status in OK_STATUSES, where
    if status != 200:
        err = json.loads(data)["error"]
        assert err["message"] and err["type"] == "invalid_request_error", where
    elif headers.get("Content-Type", "").startswith("text/event-stream"):
        assert data.endswith(b"data: [DONE]\n\n"), where
        for frame in data.split(b"\n\n")[:-2]:
            event = json.loads(frame[len(b"data: "):])
            assert "error" not in event, where
    else:
        json.loads(data)


def _fuzz(server: ServerProcess, route: str, bodies: list) -> None:
    payloads = [json.dumps(bound_cost(b, route)).encode() for b in bodies]

    async def run() -> list:
        return await asyncio.gather(*(send(server, route, p) for p in payloads))

    for payload, (status, data, headers) in zip(payloads, asyncio.run(run())):
        check_answer(route, payload, status, data, headers)


@pytest.fixture(scope="module")
def schemas(main_server: ServerProcess) -> dict:
    return main_server.get_json("/openapi.json")


@pytest.mark.parametrize("route", ROUTES)
def test_fuzz_route(main_server, schemas, route):
    comps = schemas["components"]["schemas"]
    ref = schemas["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
    well_typed = strategy(ref, comps)
    # a body: well-typed, or with one field replaced by arbitrary JSON, or arbitrary JSON
    mutated = st.tuples(well_typed, st.text(max_size=20), _json).map(
        lambda t: {**t[0], t[1]: t[2]} if isinstance(t[0], dict) else t[0])
    body = st.one_of(well_typed, well_typed, mutated, _json)

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(body, min_size=8, max_size=8))
    def check(bodies):
        _fuzz(main_server, route, bodies)

    check()
    main_server.assert_no_leak()
    main_server.assert_clean_log()


def _killers() -> list[tuple[str, bytes]]:
    def j(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    long_text = "hello " * 100_000  # ~100k tokens
    return [
        ("/generate", b"{"), ("/generate", b""), ("/generate", b"null"), ("/generate", b"[]"),
        ("/generate", b'"text"'), ("/generate", b"1e999"), ("/generate", b'{"text": "\\ud800"}'),
        ("/generate", b'{"input_ids": ' + b"[" * 100_000), ("/v1/completions", b"{" * 50_000),
        ("/generate", j({"text": 5})), ("/v1/completions", j({"prompt": {"a": 1}})),
        ("/v1/chat/completions", j({"messages": "hi"})),
        ("/v1/completions", j({})), ("/v1/chat/completions", j({"model": "default"})),
        ("/generate", j({"text": "hi", "sampling_params": {"n": 5_000_000}})),
        ("/v1/completions", j({"prompt": "hi", "n": 5_000_000})),
        ("/generate", j({"text": "hi", "return_logprob": True,
                         "top_logprobs_num": 1_000_000_000})),
        ("/v1/chat/completions", j({"messages": [{"role": "user", "content": "hi"}],
                                    "logprobs": True, "top_logprobs": 1_000_000_000})),
        ("/v1/completions", j({"prompt": "hi", "max_tokens": -1})),
        ("/generate", j({"text": "hi", "sampling_params": {"max_new_tokens": -1}})),
        ("/generate", j({"input_ids": [10**9]})), ("/generate", j({"input_ids": [-1]})),
        ("/v1/completions", j({"prompt": [49152]})),
        ("/generate", j({"text": long_text})),
        ("/v1/completions", j({"prompt": long_text, "max_tokens": 1})),
        ("/generate", j({"input_ids": [7] * 100_000})),
        ("/generate", b'{"text": "' + b"a" * (50 << 20) + b'"}'),  # 50 MB
        ("/generate", j({"text": ["x"] * 5000})),
        ("/generate", j({"text": "hi", "sampling_params": {"stop": ["a"] * 65}})),
        ("/generate", j({"text": "hi", "sampling_params": {"top_k": 2**70}})),
        ("/generate", j({"text": "hi", "sampling_params": {"max_new_tokens": 2, "seed": 2**64}})),
        ("/v1/completions", j({"prompt": "hi", "logit_bias": {"x": 1}})),
        ("/v1/completions", j({"prompt": "hi", "temperature": 1e308, "max_tokens": 1})),
    ]


def test_killers(main_server):
    killers = _killers()

    async def run() -> list:
        return await asyncio.gather(*(send(main_server, route, body) for route, body in killers))

    answers = asyncio.run(run())
    statuses = []
    for (route, body), (status, data, headers) in zip(killers, answers):
        check_answer(route, body, status, data, headers)
        statuses.append(status)
    big = [s for (r, b), s in zip(killers, statuses) if len(b) > 40 << 20]
    assert big == [413]
    assert main_server.get_json("/get_model_info")["is_generation"]  # still serving
    main_server.assert_no_leak()
    main_server.assert_clean_log()
