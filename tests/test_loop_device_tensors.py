"""The event loop never creates a device tensor: it hands the worker one host-side plan per
step (asgl/engine/contracts/step.py), and the worker thread alone talks to the device.

`DeviceTensorGuard` is a torch dispatch mode, which is thread-local: entered on the loop's
thread it sees every tensor that thread makes, and nothing the worker threads do. The GPU
test serves requests that take every per-step path (sampling parameters, penalties,
logit_bias, min_new_tokens, logprobs, a grammar, overlap) under it.
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from asgl.engine.loop.engine import Engine


class DeviceTensorGuard(TorchDispatchMode):
    """Records every op on this thread whose output lives on a `device_type` device."""

    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        self.device_type = device_type
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self.hits.append(f"{func} on {threading.current_thread().name}")
        return out


def test_guard_sees_this_thread_only():
    guard = DeviceTensorGuard("meta")
    with guard:
        torch.zeros(2, device="meta")
        torch.ones(3).to("meta")
        other = threading.Thread(target=lambda: torch.zeros(4, device="meta"))
        other.start()
        other.join()
        torch.zeros(2)  # a host tensor is fine
    assert guard.hits == [f"aten.zeros.default on {threading.current_thread().name}",
                          f"aten._to_copy.default on {threading.current_thread().name}"]


REQUESTS = [
    {"temperature": 0, "max_new_tokens": 12},
    {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 3,
     "max_new_tokens": 12},
    {"temperature": 1.0, "repetition_penalty": 1.2, "frequency_penalty": 0.5,
     "presence_penalty": 0.3, "max_new_tokens": 12},
    {"temperature": 0.7, "logit_bias": {"42": 2.0}, "min_new_tokens": 4, "max_new_tokens": 12},
    {"temperature": 0, "regex": "(yes|no), because [a-z ]{4,20}\\.", "max_new_tokens": 24},
]


def _gpu_engine_options() -> dict:
    """The GPU path as served: flashinfer, CUDA graphs, overlap. The model is the 8B dummy
    preset unless ASGL_GPU_TEST_MODEL names another; ASGL_GPU_TEST_TOKENIZER a tokenizer
    directory (the GPU suite carries SmolLM2's), else the model's own."""
    options = dict(device="cuda", random_seed=0, load_format="dummy",
                   model_path=os.environ.get("ASGL_GPU_TEST_MODEL", "llama-3.1-8b"),
                   max_running_requests=64)
    if os.environ.get("ASGL_GPU_TEST_TOKENIZER"):
        options["tokenizer_path"] = os.environ["ASGL_GPU_TEST_TOKENIZER"]
    return options


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path needs CUDA")
def test_loop_thread_creates_no_cuda_tensor_while_serving():
    guard = DeviceTensorGuard("cuda")

    async def main() -> None:
        async with Engine(**_gpu_engine_options()) as engine:
            with guard:
                outs = await asyncio.gather(*(
                    engine.generate(f"Question {i}: is the sky blue?", sp,
                                    return_logprob=True, top_logprobs_num=2)
                    for i, sp in enumerate(REQUESTS * 4)))
                async for _ in engine.generate_stream("Once upon a time", {"max_new_tokens": 8}):
                    pass
            assert all(o.completion_tokens > 0 for o in outs)

    asyncio.run(main())
    assert guard.hits == []
