"""Per-request CPU work taken off the event loop, with a deadline.

Tokenizing or rendering a long prompt can take milliseconds to seconds; on the loop it
would stall every stream. Such work runs in a small pool of its own (a burst of big
prompts cannot starve the default executor that other start-up and grammar work uses),
and the caller gives up after `timeout` seconds (the thread finishes its call and is
reused; Python cannot interrupt it, the pool's size bounds how many run at once).
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")

# Seconds a prompt may take to tokenize (or a chat to render) before the request is refused.
TOKENIZE_TIMEOUT_S = 30.0

_pool: Optional[ThreadPoolExecutor] = None
_lock = threading.Lock()


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)),
                                       thread_name_prefix="asgl-tokenize")
        return _pool


async def run_bounded(fn: Callable[..., T], *args: Any,
                      timeout: Optional[float] = None) -> T:
    """`fn(*args)` on the tokenize pool; asyncio.TimeoutError after `timeout` seconds
    (default TOKENIZE_TIMEOUT_S)."""
    loop = asyncio.get_running_loop()
    limit = TOKENIZE_TIMEOUT_S if timeout is None else timeout
    return await asyncio.wait_for(loop.run_in_executor(_get_pool(), fn, *args), limit)
