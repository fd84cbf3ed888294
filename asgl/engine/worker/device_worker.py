"""DeviceWorker: the one thread that owns a device.

The model runner is created and called only through `run`, so the device, inference mode
and CUDA streams (thread-local in torch) are set up and used on this thread alone. The
event loop awaits the returned futures; torch releases the GIL inside kernels and big tensor
ops, so the loop keeps serving HTTP while a step runs.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch

# The loop thread and the worker thread both run Python; a short switch interval keeps
# the worker from waiting 5 ms for the GIL after its kernels are launched.
_SWITCH_INTERVAL_S = 0.001


def _init_worker_thread() -> None:
    torch.set_grad_enabled(False)


class DeviceWorker:
    def __init__(self, name: str = "asgl-worker"):
        if sys.getswitchinterval() > _SWITCH_INTERVAL_S:
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name,
                                            initializer=_init_worker_thread)
        # Waits for launched GPU steps (StepOutput.wait) so that neither the loop nor the
        # launching thread blocks on the device.
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-wait")
        self.busy: dict[str, Optional[tuple]] = {"worker": None, "waiter": None}

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run `fn(*args)` on the worker thread; await the result on the loop."""
        return asyncio.get_running_loop().run_in_executor(self._executor, self._timed,
                                                          "worker", fn, args)

    def finish(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run `fn()` (a step's `wait`) on the waiter thread; await the result on the loop."""
        return asyncio.get_running_loop().run_in_executor(self._waiter, self._timed,
                                                          "waiter", fn, ())

    def _timed(self, which: str, fn: Callable[..., Any], args: tuple) -> Any:
        # what the watchdog reports when a call never returns: thread, function, since when
        self.busy[which] = (threading.current_thread().name, getattr(fn, "__qualname__", fn),
                            time.monotonic())
        try:
            return fn(*args)
        finally:
            self.busy[which] = None

    def describe_busy(self) -> Optional[str]:
        """The longest-running call on the worker or waiter thread, or None when both idle."""
        calls = [c for c in self.busy.values() if c is not None]
        if not calls:
            return None
        name, fn, since = min(calls, key=lambda c: c[2])
        return f"thread {name} has been in {fn} for {time.monotonic() - since:.1f} s"

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the worker thread and wait for it (no event loop needed)."""
        return self._executor.submit(fn, *args).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._waiter.shutdown(wait=True, cancel_futures=True)
