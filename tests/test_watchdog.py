"""The watchdog (issue 16): no progress with work queued for --watchdog-timeout turns /health
503, logs the stuck thread and every stack, and with --exit-on-stall exits non-zero."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from asgl.engine.loop.watchdog import EXIT_STATUS, Watchdog
from asgl.engine.worker.model_runner import ModelRunner
from tests.conftest import make_llm

TIMEOUT = 0.3


def _wait_for(cond, limit: float = 5.0) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_stall_then_recovery_and_exit(caplog):
    count, work, exits = [0], [True], []
    dog = Watchdog(TIMEOUT, progress=lambda: count[0], has_work=lambda: work[0],
                   where=lambda: "the device worker is stuck: here", exit_on_stall=True,
                   exit=exits.append)
    t0 = time.monotonic()
    assert dog.check(t0 + TIMEOUT / 2) is None
    with caplog.at_level(logging.CRITICAL, logger="asgl.engine.loop.watchdog"):
        why = dog.check(t0 + TIMEOUT * 2)
    assert why and "worker is stuck" in why
    assert exits == [EXIT_STATUS]
    text = caplog.text
    assert "Thread stacks" in text and "MainThread" in text
    assert "test_stall_then_recovery_and_exit" in text  # this very stack is in the dump
    count[0] += 1
    assert dog.check(t0 + TIMEOUT * 3) is None and dog.stalled is None
    work[0] = False  # an idle engine never stalls, however long
    assert dog.check(t0 + TIMEOUT * 100) is None and exits == [EXIT_STATUS]


def test_engine_stall_is_reported_on_health(monkeypatch, caplog):
    gate = threading.Event()
    real = ModelRunner.forward

    def forward(self, batch, ids):  # the injected stall: the worker blocks in a step
        gate.wait(10)
        return real(self, batch, ids)

    llm = make_llm(watchdog_timeout=TIMEOUT)
    try:
        monkeypatch.setattr(ModelRunner, "forward", forward)
        with caplog.at_level(logging.CRITICAL, logger="asgl.engine.loop.watchdog"):
            done = asyncio.run_coroutine_threadsafe(
                llm.engine.generate("Hello", {"max_new_tokens": 2, "temperature": 0}),
                llm._loop)
            assert _wait_for(lambda: llm.engine.stalled is not None)
        assert "device worker is stuck" in llm.engine.stalled
        assert "in forward" in caplog.text  # the worker's stack, down to the stuck call
        assert "asgl-worker" in caplog.text
        assert asyncio.run(_health(llm)) == 503
        gate.set()
        assert done.result(10).completion_tokens == 2
        assert _wait_for(lambda: llm.engine.stalled is None)
        assert asyncio.run(_health(llm)) == 200
    finally:
        gate.set()
        llm.shutdown()


async def _health(llm) -> int:
    from asgl.server.app import build_app

    app = build_app(llm.engine, llm.engine.config)
    async with TestClient(TestServer(app)) as client:  # an ephemeral port
        r = await client.get("/health")
        return r.status


def test_negative_timeout_refused():
    from asgl.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match="--watchdog-timeout"):
        EngineConfig(watchdog_timeout=-1)
    assert EngineConfig(watchdog_timeout=0).watchdog_timeout == 0  # 0: off
