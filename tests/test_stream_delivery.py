"""Chunks handed to the streaming routes inside the engine's step (issue 15).

`Engine.generate_into` calls its `deliver` function from the step loop itself (no task
wake-up per request per step); what it delivers equals what `generate` returns; a
`deliver` that raises ends its own request only, which frees its memory at once;
`--stream-interval` merges a choice's chunks; the SSE writer holds frames while a client
is not reading (only the newest of a cumulative stream); native `/generate` with
`--incremental-streaming-output` streams deltas whose sum is the cumulative stream's
last event. Tiny dummy model on the CPU.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from asgl.config import EngineConfig
from asgl.engine.loop.engine import Engine
from asgl.server.app import build_app
from asgl.server.sse import HIGH_WATER, SSEWriter

GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}
PROMPTS = [[11 + (7 * i + j) % 3000 for j in range(10 + i)] for i in range(4)]


def _engine(**options) -> Engine:
    return Engine(model_path="tiny-llama", load_format="dummy", device="cpu",
                  skip_tokenizer_init=True, random_seed=0, max_total_tokens=4096, **options)


async def test_generate_into_delivers_inside_the_step_and_equals_generate():
    engine = await _engine().start()
    try:
        expected = [(await engine.generate(input_ids=p, sampling_params=GREEDY)).output_ids
                    for p in PROMPTS]
        got: list[list[int]] = [[] for _ in PROMPTS]
        consumer_tasks = set()

        async def one(i: int) -> None:
            consumer_tasks.add(asyncio.current_task())

            def deliver(chunk) -> None:
                # called by the step loop, never by a woken consumer
                assert asyncio.current_task() not in consumer_tasks
                got[i].extend(chunk.token_ids)

            await engine.generate_into(deliver, input_ids=PROMPTS[i], sampling_params=GREEDY)

        await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
        assert got == expected
        assert engine.memory_state()["running"] == 0
    finally:
        await engine.shutdown()


async def test_a_failing_deliver_ends_only_its_request():
    engine = await _engine().start()
    try:
        expected = (await engine.generate(input_ids=PROMPTS[1], sampling_params=GREEDY)).output_ids
        calls = 0

        def bad(chunk) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise ConnectionResetError("the client closed the connection")

        good: list[int] = []
        results = await asyncio.gather(
            engine.generate_into(bad, input_ids=PROMPTS[0], sampling_params=GREEDY),
            engine.generate_into(lambda c: good.extend(c.token_ids), input_ids=PROMPTS[1],
                                 sampling_params=GREEDY),
            return_exceptions=True)
        assert isinstance(results[0], ConnectionResetError)
        assert results[1] is None and good == expected
        assert calls == 3  # nothing more was handed to the failed consumer
        for _ in range(20):  # its slots go back within a step
            if engine.memory_state()["running"] == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.memory_state()["running"] == 0
        assert not engine._streams
    finally:
        await engine.shutdown()


async def test_stream_interval_merges_chunks():
    engine = await _engine(stream_interval=4).start()
    try:
        expected = (await engine.generate(input_ids=PROMPTS[2], sampling_params=GREEDY)).output_ids
        chunks = []
        await engine.generate_into(chunks.append, input_ids=PROMPTS[2], sampling_params=GREEDY)
        assert [t for c in chunks for t in c.token_ids] == expected
        sizes = [len(c.token_ids) for c in chunks]
        assert sizes[0] == 1  # the first token is not held back
        assert all(s >= 4 for s in sizes[1:-1]), sizes
        assert chunks[-1].finished and sum(c.finished for c in chunks) == 1
        assert len(chunks) <= 1 + -(-(len(expected) - 1) // 4)
    finally:
        await engine.shutdown()


class _Transport:
    def __init__(self):
        self.buffered = 0
        self.writes: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.writes.append(data)


@pytest.mark.parametrize("cumulative", [False, True])
def test_sse_writer_holds_frames_for_a_slow_client(cumulative):
    sse = SSEWriter(request=None, cumulative=cumulative)
    sse.response, sse._transport, sse._chunked = object(), _Transport(), True
    sse.emit({"n": 1})
    assert sse._transport.writes == [b'f\r\ndata: {"n":1}\n\n\r\n']
    sse._transport.buffered = HIGH_WATER + 1  # the client stopped reading
    sse.emit({"n": 2})
    sse.emit({"n": 3})
    assert len(sse._transport.writes) == 1
    sse._transport.buffered = 0
    sse.emit({"n": 4})
    last = sse._transport.writes[-1]
    held = [b"2", b"3"] if not cumulative else [b"3"]
    body = b"".join(b'data: {"n":%b}\n\n' % n for n in [*held, b"4"])
    assert last == b"%x\r\n%b\r\n" % (len(body), body)


async def _events(resp) -> list[dict]:
    text = (await resp.read()).decode()
    frames = [f[len("data: "):] for f in text.split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


@pytest.mark.parametrize("incremental", [False, True])
async def test_native_stream_cumulative_and_incremental(incremental):
    engine = await _engine().start()
    try:
        config = EngineConfig(model_path="tiny-llama", load_format="dummy", device="cpu",
                              skip_tokenizer_init=True,
                              incremental_streaming_output=incremental)
        expected = (await engine.generate(input_ids=PROMPTS[3], sampling_params=GREEDY)).output_ids
        async with TestClient(TestServer(build_app(engine, config))) as client:
            r = await client.post("/generate", json={"input_ids": PROMPTS[3], "stream": True,
                                                     "sampling_params": GREEDY})
            assert r.status == 200
            events = await _events(r)
        ids = [e["output_ids"] for e in events]
        if incremental:
            assert [t for chunk in ids for t in chunk] == expected
            assert all(len(chunk) <= 1 for chunk in ids)
        else:
            assert ids[-1] == expected
            assert all(ids[k] == expected[:len(ids[k])] for k in range(len(ids)))
        assert events[-1]["meta_info"]["completion_tokens"] == len(expected)
        assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    finally:
        await engine.shutdown()


async def test_a_bug_mid_stream_is_reported_in_band_with_the_request_id(monkeypatch):
    import asgl.server.native as native

    real, calls = native._output, 0

    def failing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("a bug in rendering")
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "_output", failing)
    engine = await _engine().start()
    try:
        config = EngineConfig(model_path="tiny-llama", load_format="dummy", device="cpu",
                              skip_tokenizer_init=True)
        async with TestClient(TestServer(build_app(engine, config))) as client:
            r = await client.post("/generate", headers={"X-Request-Id": "req-42"},
                                  json={"input_ids": PROMPTS[0], "stream": True,
                                        "sampling_params": GREEDY})
            assert r.status == 200
            events = await _events(r)
            assert len(events) == 3 and "output_ids" in events[0]
            err = events[-1]["error"]
            assert "RuntimeError" in err["message"] and "request id req-42" in err["message"]
            # the server goes on serving, and the failed request left nothing behind
            ok = await client.post("/generate", json={"input_ids": PROMPTS[1],
                                                      "sampling_params": GREEDY})
            assert ok.status == 200
        assert engine.memory_state()["running"] == 0
    finally:
        await engine.shutdown()


def test_stream_interval_below_one_is_refused_naming_the_flag():
    from asgl.config import ConfigError

    with pytest.raises(ConfigError, match="--stream-interval must be >= 1, got 0"):
        EngineConfig(stream_interval=0)
    assert EngineConfig(stream_interval=3).stream_interval == 3


def test_serve_refuses_a_bad_stream_interval_at_start_up():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "asgl.cli", "serve", "--stream-interval", "-2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--stream-interval must be >= 1" in r.stderr
