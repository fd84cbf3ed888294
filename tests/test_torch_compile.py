"""--enable-torch-compile on the CPU: inductor-compiled forward passes give the eager greedy
output, compile a bounded number of graphs (no recompilation per step or per batch size),
and only batches up to --torch-compile-max-bs run compiled."""

from __future__ import annotations

import shutil

import pytest

from conftest import make_llm

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not shutil.which("g++"), reason="inductor needs a C++ compiler")]

PROMPTS = [f"List {n} colors:" for n in range(2, 9)]
GREEDY = {"max_new_tokens": 12, "temperature": 0.0}


def _generate(llm, groups):
    return [[o.output_ids for o in llm.generate(g, GREEDY)]
            for g in groups]


def test_compiled_greedy_output_equals_eager():
    import torch._dynamo
    from torch._dynamo.utils import counters

    from asgl.engine.worker.torch_compile import CompiledForward

    torch._dynamo.reset()
    counters.clear()
    eager = make_llm(dtype="float32", random_seed=0)
    tok = eager.engine.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    # batch 1, then 3 (both compiled: <= 8 tokens per step), then 7 (its prefill is eager)
    groups = [ids[:1], ids[1:4], ids]
    expected = _generate(eager, groups)
    eager.shutdown()

    llm = make_llm(dtype="float32", random_seed=0, enable_torch_compile=True,
                   torch_compile_max_bs=8)
    runner = llm.engine.runner
    assert isinstance(runner.compiled, CompiledForward)
    calls = {"compiled": 0, "eager": 0}
    compiled_fn = runner.compiled.forward

    def counting(*args, **kwargs):
        calls["compiled"] += 1
        return compiled_fn(*args, **kwargs)

    runner.compiled.forward = counting
    # the compiled function calls model.forward directly: hooks see only eager calls
    runner.model.register_forward_pre_hook(lambda *_: calls.__setitem__("eager",
                                                                         calls["eager"] + 1))
    assert _generate(llm, groups) == expected
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0 and calls["compiled"] > 0
    # more steps and new batch sizes reuse the dynamic graphs: nothing is compiled again
    assert _generate(llm, [ids[:2], ids[:5]]) == [expected[2][:2], expected[2][:5]]
    assert counters["stats"]["unique_graphs"] == graphs
    # steps of more than 8 tokens run the eager model (the prefills of 3 and more prompts)
    assert calls["eager"] > 0
    llm.shutdown()
