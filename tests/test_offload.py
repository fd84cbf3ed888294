"""Big prompts are tokenized off the event loop with a deadline (issue 16)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from asgl.engine.loop import offload
from asgl.server import prompts
from asgl.server.errors import ApiError


async def test_runs_off_the_loop_and_gives_up_at_the_deadline(monkeypatch):
    loop_thread = threading.get_ident()
    assert await offload.run_bounded(threading.get_ident) != loop_thread
    gate = threading.Event()
    ticks = 0

    async def ticker():  # the loop keeps running while the slow call waits
        nonlocal ticks
        while not gate.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    with pytest.raises(asyncio.TimeoutError):
        await offload.run_bounded(gate.wait, 5, timeout=0.2)
    gate.set()
    await task
    assert ticks >= 5


async def test_server_tokenizing_past_the_deadline_is_503(monkeypatch):
    monkeypatch.setattr(offload, "TOKENIZE_TIMEOUT_S", 0.1)
    with pytest.raises(ApiError) as err:
        await prompts._maybe_offload(10 ** 6, time.sleep, 1.0)
    assert err.value.status == 503 and "tokenizing" in err.value.message
    assert await prompts._maybe_offload(10 ** 6, len, "abc") == 3
