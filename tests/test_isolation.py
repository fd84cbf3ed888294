"""Isolation (issue 16): a step that fails because of one request ends that request alone.

One request in a batch of 32 carries a marker (a tiny logit_bias, also present in the
fault-free run) that the injected fault keys on; the other 31 greedy outputs must equal
those of the run without the fault, the marked request must end with an error, and the
engine must go on serving with its memory intact.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from asgl.engine.loop.engine import Engine
from asgl.engine.sampling.penalties import SparseLogitEdits
from tests.conftest import make_llm, run_on

N = 32
BAD = 7
MARK = 0.125  # the marked request's logit_bias value: unique in the batch
PROMPTS = [f"Note {i}: the {w} said that" for i, w in enumerate(
    ["cat", "robot", "king", "mouse", "pilot", "painter", "dragon", "child"] * 4)]
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
MARKED = dict(GREEDY, logit_bias={"5": MARK})


@pytest.fixture(scope="module")
def llm():
    engine = make_llm()
    yield engine
    engine.shutdown()


def _batch(llm) -> list:
    async def run():
        tasks = [llm.engine.generate(p, MARKED if i == BAD else GREEDY)
                 for i, p in enumerate(PROMPTS)]
        return await asyncio.gather(*tasks)
    return run_on(llm, run())


@pytest.fixture(scope="module")
def clean(llm):
    return _batch(llm)


def _marked_rows(edits: SparseLogitEdits) -> torch.Tensor:
    if edits.bias_index is None:
        return torch.empty(0, dtype=torch.int64)
    return edits.bias_index[0][edits.bias_values == MARK]


def _nan_logits(monkeypatch):
    real = SparseLogitEdits.apply

    def apply(self, logits):
        real(self, logits)
        logits[_marked_rows(self)] = float("nan")
    monkeypatch.setattr(SparseLogitEdits, "apply", apply)


def _sampler_raises(monkeypatch):
    real = SparseLogitEdits.apply

    def apply(self, logits):
        if _marked_rows(self).numel():
            raise ValueError("injected sampling fault")
        real(self, logits)
    monkeypatch.setattr(SparseLogitEdits, "apply", apply)


def _detokenizer_raises(monkeypatch):
    real = Engine._detok_factory

    def factory(self, sp):
        make = real(self, sp)
        if not (sp.logit_bias and MARK in sp.logit_bias.values()):
            return make

        def poisoned(ids):
            detok = make(ids)

            def step(new_ids):
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
            detok.step = step
            return detok
        return poisoned
    monkeypatch.setattr(Engine, "_detok_factory", factory)


@pytest.mark.parametrize("inject", [_nan_logits, _sampler_raises, _detokenizer_raises],
                         ids=["nan-logits", "sampler-raises", "detokenizer-raises"])
def test_one_bad_request_in_a_batch_of_32(llm, clean, monkeypatch, inject):
    inject(monkeypatch)
    faulty = _batch(llm)
    assert faulty[BAD].finish_reason["type"] == "abort"
    assert faulty[BAD].finish_reason.get("message")
    for i in range(N):
        if i != BAD:
            assert faulty[i].output_ids == clean[i].output_ids, i
            assert faulty[i].finish_reason == clean[i].finish_reason, i
    monkeypatch.undo()
    # the engine goes on: the marked request itself now gives its fault-free output
    again = llm.generate(PROMPTS[BAD], MARKED)
    assert again.output_ids == clean[BAD].output_ids
    assert llm.engine.scheduler.is_idle_and_clean()


def test_fault_free_marked_run_is_the_reference(clean):
    # the marker changes nothing by itself (else the test above could pass vacuously)
    assert all(len(o.output_ids) == GREEDY["max_new_tokens"] for o in clean)
    assert clean[BAD].finish_reason["type"] == "length"


def test_failed_forward_pass_does_not_kill_the_worker(llm, clean, monkeypatch):
    # a forward pass that raises is no request's fault: its requests end, nothing else dies
    from asgl.engine.worker.model_runner import ModelRunner

    real = ModelRunner.forward
    calls = {"n": 0}

    def forward(self, batch, ids):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected forward fault")
        return real(self, batch, ids)
    monkeypatch.setattr(ModelRunner, "forward", forward)
    out = llm.generate(PROMPTS[0], GREEDY)
    assert out.finish_reason["type"] == "abort"
    monkeypatch.undo()
    assert llm.generate(PROMPTS[0], GREEDY).output_ids == clean[0].output_ids
    assert llm.engine.worker._executor._threads  # the same worker thread still serves


def test_sampler_flags_non_finite_rows_and_keeps_the_others():
    # sampled (not greedy) rows: the draw must stay in range on NaN / +inf / all-banned rows
    from asgl.engine.sampling.batch import SamplingBatch
    from asgl.engine.sampling.sampler import Sampler

    gen = torch.Generator().manual_seed(0)
    s, v = 6, 50
    logits = torch.randn(s, v, generator=gen)
    sb = SamplingBatch(size=s, vocab_size=v, all_greedy=False,
                       temperatures=torch.full((s, 1), 0.8),
                       rng_keys=torch.arange(s, dtype=torch.int64) * 7919,
                       steps=torch.zeros(s, dtype=torch.int64))
    clean = Sampler().sample(logits, sb)
    poisoned = logits.clone()
    poisoned[1, 3] = float("nan")
    poisoned[3, 9] = float("inf")
    poisoned[4] = float("-inf")
    out = Sampler().sample(poisoned, sb)
    assert out.bad_rows.tolist() == [False, True, False, True, True, False]
    assert ((out.next_token_ids >= 0) & (out.next_token_ids < v)).all()
    keep = [0, 2, 5]
    assert out.next_token_ids[keep].tolist() == clean.next_token_ids[keep].tolist()
    assert not clean.bad_rows.any()
