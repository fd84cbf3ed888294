"""SGLang's native API on a live `asgl serve`, over raw HTTP (aiohttp): /generate plain,
batch and streaming (exact SSE framing), logprobs, abort, disconnects, the info routes and
/metrics."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest

from server_fixture import ServerProcess, main_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)

PROMPT = "Once upon a time,"
GREEDY = {"max_new_tokens": 8, "temperature": 0}


async def post(server: ServerProcess, path: str, body: dict, **kw) -> tuple[int, object]:
    async with aiohttp.ClientSession(headers=server.headers) as s:
        async with s.post(server.url + path, json=body, **kw) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text


async def stream_raw(server: ServerProcess, path: str, body: dict) -> bytes:
    async with aiohttp.ClientSession(headers=server.headers) as s:
        async with s.post(server.url + path, json=body) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            return await r.read()


def sse_events(raw: bytes) -> list[dict]:
    """Parse a whole SSE body, asserting the exact framing: `data: <json>\\n\\n` events and
    a final `data: [DONE]\\n\\n`, nothing else."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]"
    events = []
    for frame in frames[:-2]:
        assert frame.startswith(b"data: ") and b"\n" not in frame, frame
        events.append(json.loads(frame[6:]))
    return events


def check_meta(meta: dict, completion_tokens: int | None = None) -> None:
    assert set(meta) >= {"id", "prompt_tokens", "completion_tokens", "cached_tokens",
                         "finish_reason", "e2e_latency"}
    if completion_tokens is not None:
        assert meta["completion_tokens"] == completion_tokens


async def test_generate_plain(main_server):
    status, out = await post(main_server, "/generate", {"text": PROMPT,
                                                        "sampling_params": GREEDY})
    assert status == 200, out
    assert isinstance(out["text"], str) and out["text"]
    check_meta(out["meta_info"], len(out["output_ids"]))
    assert out["meta_info"]["prompt_tokens"] > 0
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] in ("length", "stop")
    if reason["type"] == "length":
        assert reason["length"] == 8 == out["meta_info"]["completion_tokens"]
    # greedy is deterministic; the second time the prompt comes from the prefix cache
    status, again = await post(main_server, "/generate", {"text": PROMPT,
                                                          "sampling_params": GREEDY})
    assert again["text"] == out["text"]
    assert again["meta_info"]["cached_tokens"] > 0


async def test_generate_batch_text_and_ids(main_server):
    status, outs = await post(main_server, "/generate", {
        "text": ["The capital of France is", "1, 2, 3,"],
        "sampling_params": [{"max_new_tokens": 3, "temperature": 0},
                            {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}]})
    assert status == 200, outs
    assert [o["meta_info"]["completion_tokens"] for o in outs][1] == 5
    ids = [[504, 3458, 282], [28, 30, 34]]
    status, outs = await post(main_server, "/generate", {
        "input_ids": ids, "rid": ["batch-a", "batch-b"],
        "sampling_params": {"max_new_tokens": 2, "temperature": 0.7, "n": 2, "ignore_eos": True}})
    assert status == 200, outs
    assert len(outs) == 4  # prompt-major: a0 a1 b0 b1
    assert [o["meta_info"]["id"] for o in outs] == ["batch-a-0", "batch-a-1", "batch-b-0",
                                                    "batch-b-1"]
    assert all(o["meta_info"]["prompt_tokens"] == 3 for o in outs)
    assert all(len(o["output_ids"]) == 2 for o in outs)


async def test_stream_framing_and_equality(main_server):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 10, "temperature": 0}}
    status, whole = await post(main_server, "/generate", body)
    events = sse_events(await stream_raw(main_server, "/generate", {**body, "stream": True}))
    assert len(events) >= 2
    # each event carries the text so far (SGLang clients print text[len(prev):])
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == whole["text"]
    assert events[-1]["output_ids"] == whole["output_ids"]
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["meta_info"]["finish_reason"] == whole["meta_info"]["finish_reason"]
    assert "index" not in events[0]


async def test_batch_stream_is_indexed(main_server):
    raw = await stream_raw(main_server, "/generate", {
        "text": ["Hello", "Goodbye"], "stream": True,
        "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}})
    events = sse_events(raw)
    last = {e["index"]: e for e in events}
    assert sorted(last) == [0, 1]
    assert all(e["meta_info"]["completion_tokens"] == 3 for e in last.values())


async def test_logprobs(main_server):
    status, out = await post(main_server, "/generate", {
        "text": PROMPT, "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3,
        "return_text_in_logprobs": True})
    assert status == 200, out
    meta = out["meta_info"]
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert meta["input_token_logprobs"][0][0] is None  # the first prompt token: no logprob
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]
    for (lp, tid, text), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert lp <= 0 and isinstance(text, str) and len(top) == 3
        assert top[0][1] == tid  # greedy picks the most likely token
        assert top[0][0] == pytest.approx(lp, abs=1e-4)
    assert meta["output_token_logprobs"][0][1] == out["output_ids"][0]


async def test_abort_request(main_server):
    rid = "abort-me"
    body = {"text": "Count forever:", "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}
    async with aiohttp.ClientSession() as s:
        async with s.post(main_server.url + "/generate", json=body) as r:
            first = await r.content.readline()
            assert first.startswith(b"data: ")
            status, res = await post(main_server, "/abort_request", {"rid": rid})
            assert status == 200 and res["aborted"] == [rid]
            events = sse_events(first + await r.read())
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert events[-1]["meta_info"]["completion_tokens"] < 900
    status, res = await post(main_server, "/abort_request", {"rid": "no-such-rid"})
    assert status == 200 and res["success"] is False


async def _disconnects(server: ServerProcess, stream: bool) -> None:
    """A client that goes away aborts its request: the server is idle long before the
    900 tokens it asked for could have been generated."""
    body = {"text": "Write a very long story.", "stream": stream,
            "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with aiohttp.ClientSession() as s:
        if stream:
            async with s.post(server.url + "/generate", json=body) as r:
                for _ in range(3):
                    assert (await r.content.readline()).startswith(b"data: ")
                    await r.content.readline()
                r.close()  # drop the connection mid-stream
        else:
            with pytest.raises(asyncio.TimeoutError):
                await s.post(server.url + "/generate", json=body,
                             timeout=aiohttp.ClientTimeout(total=1.0))
    mem = await loop.run_in_executor(None, server.wait_idle, 10.0)
    assert mem["running"] == 0 and mem["waiting"] == 0
    assert loop.time() - start < 15


async def test_disconnect_aborts_streaming(main_server):
    await _disconnects(main_server, stream=True)


async def test_disconnect_aborts_non_streaming(main_server):
    before = _metric(await _get_text(main_server, "/metrics"),
                     'asgl:http_requests_total{route="/generate",status="499"}')
    await _disconnects(main_server, stream=False)
    after = _metric(await _get_text(main_server, "/metrics"),
                    'asgl:http_requests_total{route="/generate",status="499"}')
    assert after == before + 1


async def _get_text(server: ServerProcess, path: str) -> str:
    async with aiohttp.ClientSession(headers=server.headers) as s:
        async with s.get(server.url + path) as r:
            assert r.status == 200, path
            return await r.text()


def _metric(text: str, name: str) -> float:
    m = re.search("^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_info_routes(main_server):
    info = json.loads(await _get_text(main_server, "/get_model_info"))
    assert info["is_generation"] is True and info["context_length"] == 1024
    server = json.loads(await _get_text(main_server, "/get_server_info"))
    assert server["port"] == main_server.port and server["api_key"] is None
    assert set(server["memory_state"]) >= {"capacity", "free", "cached", "running", "waiting"}
    assert await _get_text(main_server, "/health") == ""
    assert await _get_text(main_server, "/health_generate") == ""
    doc = json.loads(await _get_text(main_server, "/openapi.json"))
    assert "/generate" in doc["paths"]
    status, text = await post(main_server, "/flush_cache", {})
    assert status == 200 and "flushed" in text


async def test_metrics(main_server):
    await post(main_server, "/generate", {"text": "Hi", "sampling_params": GREEDY})
    text = await _get_text(main_server, "/metrics")
    for name in ("asgl:num_running_reqs", "asgl:num_queue_reqs", "asgl:kv_cache_usage_ratio",
                 "asgl:cache_hit_rate", "asgl:prompt_tokens_total",
                 "asgl:generation_tokens_total", "asgl:time_to_first_token_seconds_count",
                 "asgl:inter_token_latency_seconds_count", "asgl:e2e_request_latency_seconds_count",
                 "asgl:queue_time_seconds_count"):
        assert re.search("^" + re.escape(name) + r"(\{.*\})? ", text, re.M), name
    assert _metric(text, 'asgl:http_requests_total{route="/generate",status="200"}') >= 1
    assert _metric(text, "asgl:generation_tokens_total") >= 1
    assert _metric(text, "asgl:time_to_first_token_seconds_count") >= 1


async def test_bad_native_requests(main_server):
    cases = [
        ({"text": PROMPT, "input_ids": [1]}, "text"),
        ({}, "text"),
        ({"text": []}, "text"),
        ({"input_ids": [[1, 2], 3]}, "input_ids"),
        ({"input_ids": [1, 10**9]}, "input_ids"),
        ({"text": PROMPT, "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"text": PROMPT, "sampling_params": {"max_new_tokens": 5000}}, "max_new_tokens"),
        ({"text": PROMPT, "sampling_params": {"n": 5000000}}, "n"),
        ({"text": PROMPT, "sampling_params": {"temprature": 0}}, "sampling_params.temprature"),
        ({"text": PROMPT, "sampling_params": {"temperature": "hot"}}, "sampling_params"),
        ({"text": PROMPT, "return_logprob": True, "top_logprobs_num": 1000000000},
         "top_logprobs_num"),
        ({"text": PROMPT, "return_logprob": True, "logprob_start_len": 10**6},
         "logprob_start_len"),
        ({"text": ["a", "b"], "rid": "same"}, "rid"),
        ({"text": ["a", "b"], "rid": ["same", "same"]}, "rid"),
        ({"text": PROMPT, "image_data": "x.png"}, "image_data"),
        ({"text": PROMPT, "lora": 1}, "lora"),
    ]
    for body, param in cases:
        status, out = await post(main_server, "/generate", body)
        assert status == 400, (body, out)
        err = out["error"]
        assert err["type"] == "invalid_request_error" and err["message"], body
        assert err["param"] == param, (body, err)
