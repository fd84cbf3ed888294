"""A bounded loopback load test: 200 concurrent streaming clients with short outputs, a
fifth of them hanging up midway, plus non-streaming clients that time out. Every other
request completes with the right text, nothing keeps running, and no KV slot leaks."""

from __future__ import annotations

import asyncio
import json
import random
import re

import aiohttp
import pytest

from server_fixture import ServerProcess, main_server  # noqa: F401

pytestmark = pytest.mark.timeout(600)

PROMPTS = ["The capital of France is", "Once upon a time,", "def fibonacci(n):",
           "The best way to learn is", "Water boils at"]
STREAMS = 200
HANG_UP_EVERY = 5  # 20% of the streaming clients disconnect after their first event
SLOW_QUITTERS = 10  # non-streaming clients that give up while their request runs
MAX_TOKENS = 8


def _body(prompt: str, stream: bool, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


async def _stream(session: aiohttp.ClientSession, url: str, prompt: str,
                  hang_up: bool) -> str | None:
    async with session.post(url, json=_body(prompt, True)) as r:
        assert r.status == 200, await r.text()
        text = []
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                return "".join(text)
            event = json.loads(line[6:])
            text.append(event["choices"][0]["text"])
            if hang_up:
                r.close()
                return None
        raise AssertionError("stream ended without [DONE]")


async def _quitter(session: aiohttp.ClientSession, url: str, prompt: str) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await session.post(url, json=_body(prompt, False, max_tokens=300),
                           timeout=aiohttp.ClientTimeout(total=1.5))


def _metric(text: str, name: str) -> float:
    m = re.search("^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_load_with_disconnects(main_server: ServerProcess):
    url = main_server.url + "/v1/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=300)) as s:
        # the expected greedy text of each prompt, one request at a time
        expected = {}
        for p in PROMPTS:
            async with s.post(url, json=_body(p, False)) as r:
                expected[p] = (await r.json())["choices"][0]["text"]
        async with s.get(main_server.url + "/metrics") as r:
            gone_before = _metric(await r.text(),
                                  'asgl:http_requests_total{route="/v1/completions",status="499"}')

        rng = random.Random(0)
        jobs = []
        for i in range(STREAMS):
            prompt = rng.choice(PROMPTS)
            jobs.append((prompt, _stream(s, url, prompt, hang_up=i % HANG_UP_EVERY == 0)))
        quitters = [_quitter(s, url, rng.choice(PROMPTS)) for _ in range(SLOW_QUITTERS)]
        results = await asyncio.gather(*(j for _, j in jobs), *quitters)

        completed = [(p, text) for (p, _), text in zip(jobs, results[:STREAMS])
                     if text is not None]
        assert len(completed) == STREAMS - STREAMS // HANG_UP_EVERY
        wrong = [(p, t) for p, t in completed if t != expected[p]]
        assert not wrong, wrong[:3]

        mem = await asyncio.get_running_loop().run_in_executor(None, main_server.wait_idle)
        assert mem["running"] == 0 and mem["waiting"] == 0, mem
        async with s.get(main_server.url + "/metrics") as r:
            metrics = await r.text()
    assert _metric(metrics, "asgl:num_running_reqs") == 0
    assert _metric(metrics, "asgl:num_queue_reqs") == 0
    gone = _metric(metrics, 'asgl:http_requests_total{route="/v1/completions",status="499"}')
    assert gone - gone_before >= SLOW_QUITTERS  # the server saw them leave
    main_server.assert_no_leak()
    main_server.assert_clean_log()
