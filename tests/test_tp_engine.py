"""Tensor parallelism on the CPU (gloo): greedy outputs of TP=N equal TP=1.

TP=N runs in driver subprocesses (rank 0 there, ranks >= 1 its children), all started
together at module set-up so their start-ups overlap; TP=1 runs here and gives the
reference with its top-2 logit gap at every token. A divergence is accepted only after a
near-tie of the reference (gap < 1e-3), as in test_engine_hf.py.

- TP=3 on the embedded SmolLM2-135M (9 query / 3 KV heads: one KV head per rank), one
  prompt long enough that a step's payload overflows the first control broadcast;
- TP=2 on a tiny random Qwen2-style checkpoint saved with save_pretrained (q/k/v bias,
  KV heads split), loaded from safetensors;
- TP=4 on `tiny-llama` with dummy weights (4 query / 2 KV heads: each KV head replicated on
  two ranks; dummy weights drawn unsharded so they equal TP=1's).
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import make_llm
from tests.parallel_helpers import Driver, assert_greedy_matches, reference

GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
SMALL_KV = {"max_total_tokens": 4096, "device": "cpu", "random_seed": 0}


def _long_prompt() -> str:
    words = "the quick brown fox jumps over a lazy dog while seven sleepy cats watch".split()
    rng = random.Random(0)
    return " ".join(rng.choice(words) for _ in range(420)) + ". In short,"


def _tiny_qwen2_dir(path) -> str:
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=False,
        eos_token_id=0, bos_token_id=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _cases(tmp_path) -> dict[str, tuple[dict, list, int]]:
    """name: (engine options, prompts, TP size)."""
    rng = random.Random(1)
    return {
        "smollm2": (dict(SMALL_KV), ["The capital of France is", "def fibonacci(n):\n    ",
                                     "Once upon a time, in a small village by the sea,",
                                     _long_prompt()], 3),
        "tiny_qwen2": (dict(SMALL_KV, model_path=_tiny_qwen2_dir(tmp_path / "tiny_qwen2"),
                            skip_tokenizer_init=True),
                       [[rng.randrange(2, 320) for _ in range(n)] for n in (5, 17, 40, 9)], 2),
        "tiny_llama": (dict(SMALL_KV, model_path="tiny-llama", load_format="dummy"),
                       ["Hello, my name is", "The weather today", "1 2 3 4 5 6 7",
                        "Why is the sky"], 4),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cases = _cases(tmp_path_factory.mktemp("tp"))
    drivers = {}
    try:
        for name, (options, prompts, tp) in cases.items():
            drivers[name] = Driver({**options, "tp_size": tp}, prompts, GREEDY)
        yield {name: (cases[name], drivers[name]) for name in cases}
    finally:
        for driver in drivers.values():
            driver.close()


def _check(runs, name: str) -> None:
    (options, prompts, tp), driver = runs[name]
    llm = make_llm(**options)
    try:
        refs = reference(llm, prompts, GREEDY)
    finally:
        llm.shutdown()
    for i, (ids, ref) in enumerate(zip(driver.result(), refs)):
        assert_greedy_matches(ids, ref, f"{name} TP={tp} prompt {i}")


def test_tp3_smollm2_matches_tp1(runs):
    _check(runs, "smollm2")


def test_tp2_saved_tiny_checkpoint_matches_tp1(runs):
    _check(runs, "tiny_qwen2")


def test_tp4_tiny_llama_replicated_kv_heads_matches_tp1(runs):
    _check(runs, "tiny_llama")
