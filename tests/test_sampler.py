"""Sampler: greedy, filters, counter-based seeded randomness, penalties, bias, logprobs."""

from __future__ import annotations

import random

import pytest
import torch

from asgl.engine.sampling.penalties import PenaltyBatch
from asgl.engine.scheduler.req import Req
from asgl.engine.sampling.sampler import (Sampler, SamplingBatch, compute_prompt_logprobs,
                                 counter_uniform, seed_key)
from asgl.engine.contracts.sampling_params import SamplingParams

V = 64
CPU = torch.device("cpu")


def make_req(seed: int = 0, prompt: list[int] | None = None, output: list[int] | None = None,
             eos: tuple[int, ...] = (), return_logprob: bool = False, top_logprobs_num: int = 0,
             **sp) -> Req:
    return Req(rid=f"r{seed}", prompt_ids=list(prompt or [1, 2, 3]),
               sampling=SamplingParams(**sp), seed=seed, eos_ids=frozenset(eos),
               return_logprob=return_logprob, top_logprobs_num=top_logprobs_num,
               output_ids=list(output or []))


def sample(reqs: list[Req], logits: torch.Tensor, **kw):
    sb = SamplingBatch.from_reqs(reqs, logits.shape[-1], **kw).to(CPU)
    return Sampler().sample(logits, sb)


def crafted_logits(probs: list[float], vocab: int = V) -> torch.Tensor:
    """Logits whose softmax puts `probs` on tokens 0.. and ~nothing elsewhere."""
    logits = torch.full((vocab,), -1e4)
    logits[: len(probs)] = torch.tensor(probs).log()
    return logits


# ---------------------------------------------------------------- greedy
def test_greedy_is_argmax_and_lean():
    logits = torch.randn(6, V)
    reqs = [make_req(i, temperature=0.0) for i in range(6)]
    sb = SamplingBatch.from_reqs(reqs, V).to(CPU)
    assert sb.plain_greedy and sb.temperatures is None and sb.rng_keys is None
    out = Sampler().sample(logits, sb)
    assert torch.equal(out.next_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_logprobs_ids is None


def test_top_k_1_is_greedy_in_mixed_batch():
    logits = torch.randn(8, V)
    reqs = [make_req(i, top_k=1) if i % 2 else make_req(i, temperature=1.5) for i in range(8)]
    ids = sample(reqs, logits).next_token_ids
    assert torch.equal(ids[1::2], logits[1::2].argmax(-1))


# ---------------------------------------------------------------- filters
PROBS = [0.4, 0.3, 0.2, 0.06, 0.04]


@pytest.mark.parametrize("params,allowed", [
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_p=0.6), {0, 1}),  # mass before token 2 is 0.7 > 0.6
    (dict(min_p=0.3), {0, 1, 2}),  # threshold 0.3 * 0.4 = 0.12
    (dict(top_k=4, top_p=0.75), {0, 1, 2}),  # top_p on the top-4 mass 0.96
    (dict(top_p=0.9, min_p=0.6), {0, 1}),
])
def test_filters_never_pick_filtered_tokens(params, allowed):
    n = 3000
    logits = crafted_logits(PROBS).expand(n, V).contiguous()
    reqs = [make_req(seed, temperature=1.0, **params) for seed in range(n)]
    ids = sample(reqs, logits).next_token_ids
    counts = torch.bincount(ids, minlength=V)
    assert set(torch.nonzero(counts).view(-1).tolist()) == allowed
    # kept tokens follow the renormalized distribution
    kept = torch.tensor([PROBS[i] for i in sorted(allowed)])
    expect = kept / kept.sum() * n
    got = counts[sorted(allowed)].float()
    assert ((got - expect).abs() < 5 * expect.sqrt() + 5).all(), (got, expect)


# ---------------------------------------------------------------- counter-based RNG
def _mix32_ref(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def test_counter_uniform_matches_integer_reference():
    seeds = [0, 1, 2, 12345, 2**63 - 1, 2**64 - 1, -1, -(2**63), 987654321987]
    steps = [0, 1, 7, 1000, 2**31, 2**32 - 1, 5, 3, 123456]
    u = counter_uniform(torch.tensor([seed_key(s) for s in seeds]), torch.tensor(steps))
    for s, t, got in zip(seeds, steps, u.tolist()):
        k = seed_key(s) & (2**64 - 1)
        h = _mix32_ref(_mix32_ref((t & 0xFFFFFFFF) ^ (k & 0xFFFFFFFF)) ^ (k >> 32))
        assert got == (h >> 8) / 2**24
    assert ((u >= 0) & (u < 1)).all()


def test_counter_uniform_is_uniform_over_seeds_and_steps():
    n = 20000
    over_seeds = counter_uniform(torch.tensor([seed_key(s) for s in range(n)]),
                                 torch.zeros(n, dtype=torch.int64))
    over_steps = counter_uniform(torch.full((n,), seed_key(7)), torch.arange(n))
    for u in (over_seeds, over_steps):
        hist = torch.histc(u, bins=20, min=0, max=1)
        assert ((hist - n / 20).abs() < 5 * (n / 20) ** 0.5).all()
        assert abs(u.mean().item() - 0.5) < 0.01


def _random_other_req(rng: random.Random, steps_done: int) -> Req:
    kinds = [dict(temperature=0.0), dict(temperature=1.3, top_k=5), dict(top_p=0.5),
             dict(min_p=0.2, temperature=0.7), dict(repetition_penalty=1.3, frequency_penalty=0.5),
             dict(logit_bias={"3": 2.0}), dict(top_k=1)]
    return make_req(rng.randrange(10**9), output=[rng.randrange(V) for _ in range(steps_done)],
                    return_logprob=rng.random() < 0.3, top_logprobs_num=rng.randrange(3),
                    **rng.choice(kinds))


def test_seeded_request_same_alone_or_in_any_batch():
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    params = dict(temperature=0.8, top_p=0.95, top_k=40)
    alone: list[int] = []
    batched: list[int] = []
    for step in range(24):
        row = torch.randn(V, generator=gen) * 2
        target = make_req(1234, output=alone, **params)
        alone.append(sample([target], row[None]).next_token_ids[0].item())

        pos = rng.randrange(8)
        others = [_random_other_req(rng, rng.randrange(30)) for _ in range(7)]
        reqs = others[:pos] + [make_req(1234, output=batched, **params)] + others[pos:]
        logits = torch.randn(8, V, generator=gen) * 2
        logits[pos] = row
        batched.append(sample(reqs, logits).next_token_ids[pos].item())
    assert alone == batched
    assert len(set(alone)) > 3  # it really sampled


def test_step_offsets_shift_the_output_index():
    logits = torch.randn(1, V)
    later = make_req(5, output=[1, 2, 3], temperature=1.0)
    early = make_req(5, output=[1, 2], temperature=1.0)
    sb_late = SamplingBatch.from_reqs([later], V).to(CPU)
    sb_early = SamplingBatch.from_reqs([early], V, step_offsets=[1]).to(CPU)
    assert torch.equal(sb_late.steps, sb_early.steps)
    assert torch.equal(Sampler().sample(logits, sb_late).next_token_ids,
                       Sampler().sample(logits, sb_early).next_token_ids)


def test_different_seeds_differ():
    logits = torch.zeros(1, V)  # uniform: any two streams agree on a token w.p. 1/64
    seqs = []
    for seed in (1, 2):
        out: list[int] = []
        for _ in range(40):
            out.append(sample([make_req(seed, output=out)], logits).next_token_ids[0].item())
        seqs.append(out)
    assert sum(a == b for a, b in zip(*seqs)) < 8


def test_temperature_frequencies_match_softmax():
    n, vocab, temp = 40000, 8, 0.7
    logits = torch.tensor([1.0, 0.5, 0.0, -0.3, -1.0, 0.8, -2.0, 0.2])
    expect = torch.softmax(logits / temp, dim=-1) * n
    # many seeds at one step, and one seed at many steps
    by_seed = sample([make_req(s, temperature=temp) for s in range(n)],
                     logits.expand(n, vocab).contiguous()).next_token_ids
    by_step = sample([make_req(99, temperature=temp) for _ in range(n)],
                     logits.expand(n, vocab).contiguous(),
                     step_offsets=list(range(n))).next_token_ids
    for ids in (by_seed, by_step):
        got = torch.bincount(ids, minlength=vocab).float()
        chi2 = ((got - expect) ** 2 / expect).sum().item()
        assert chi2 < 24.3, chi2  # df = 7, p = 0.001


# ---------------------------------------------------------------- penalties, bias, bans
def reference_penalties(logits: torch.Tensor, req: Req) -> torch.Tensor:
    out = logits.clone()
    sp = req.sampling
    for tok in set(req.prompt_ids) | set(req.output_ids):
        x = out[tok].item()
        out[tok] = x / sp.repetition_penalty if x > 0 else x * sp.repetition_penalty
    for tok in set(req.output_ids):
        out[tok] -= sp.frequency_penalty * req.output_ids.count(tok) + sp.presence_penalty
    return out


PENALTY_KINDS = [dict(repetition_penalty=1.5), dict(frequency_penalty=0.7),
                 dict(presence_penalty=-1.2), dict(repetition_penalty=0.6, frequency_penalty=-0.4,
                                                   presence_penalty=1.1), dict()]


@pytest.mark.parametrize("all_rows", [True, False])
def test_penalties_match_reference(all_rows):
    rng = random.Random(1)
    kinds = PENALTY_KINDS[:-1] if all_rows else PENALTY_KINDS
    reqs = [make_req(i, prompt=[rng.randrange(V) for _ in range(10)],
                     output=[rng.randrange(V) for _ in range(rng.randrange(20))],
                     temperature=0.0, **kinds[i % len(kinds)]) for i in range(10)]
    logits = torch.randn(10, V) * 3
    expect = torch.stack([reference_penalties(logits[i], r) for i, r in enumerate(reqs)])

    rows = [i for i, r in enumerate(reqs) if r.sampling.has_penalties]
    pb = PenaltyBatch.build([reqs[i] for i in rows], rows, 10, V).to(CPU)
    assert (pb.rows is None) == all_rows
    got = logits.clone()
    pb.apply(got)
    torch.testing.assert_close(got, expect)
    # end to end: greedy picks the argmax of the penalized logits; the input is untouched
    before = logits.clone()
    assert torch.equal(sample(reqs, logits).next_token_ids, expect.argmax(-1))
    assert torch.equal(logits, before)


def test_logit_bias_forces_and_forbids_tokens():
    n = 200
    logits = torch.randn(n, V)
    forced = sample([make_req(s, temperature=1.0, logit_bias={"7": 100.0}) for s in range(n)],
                    logits).next_token_ids
    assert (forced == 7).all()
    top = logits.argmax(-1)
    reqs = [make_req(s, temperature=0.0, logit_bias={str(t): -100.0})
            for s, t in enumerate(top.tolist())]
    assert not (sample(reqs, logits).next_token_ids == top).any()


def test_min_new_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(4, V)
    logits[:, 3] = 50.0  # EOS
    logits[:, 5] = 40.0  # a stop token id
    logits[:, 9] = 30.0
    common = dict(eos=(3,), min_new_tokens=2, stop_token_ids=[5])
    reqs = [make_req(0, output=[1], temperature=0.0, **common),  # 1 < 2: banned
            make_req(1, output=[1], temperature=1.0, **common),  # sampled rows too
            make_req(2, output=[1, 1], temperature=0.0, **common),  # reached: allowed
            make_req(3, output=[], temperature=0.0, eos=(3,))]  # no min: allowed
    assert sample(reqs, logits).next_token_ids.tolist() == [9, 9, 3, 3]
    # with overlap the in-flight token counts: output index 1 + 1 = 2 reaches the minimum
    assert sample(reqs[:1], logits[:1], step_offsets=[1]).next_token_ids.tolist() == [3]


# ---------------------------------------------------------------- logprobs
def test_logprobs_are_raw_log_softmax_with_sorted_alternatives():
    logits = torch.randn(5, V) * 2
    reqs = [make_req(0, temperature=0.5, repetition_penalty=1.8, output=[4, 4],
                     return_logprob=True, top_logprobs_num=3),
            make_req(1, temperature=0.0, logit_bias={"2": 5.0}, return_logprob=True,
                     top_logprobs_num=5),
            make_req(2, temperature=1.0),  # asked for nothing: rows still filled
            make_req(3, top_p=0.5, return_logprob=True),
            make_req(4, temperature=0.0, return_logprob=True)]
    out = sample(reqs, logits)
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.next_token_ids[:, None])[:, 0])
    assert out.top_logprobs_ids.shape == (5, 5)
    vals, ids = raw.topk(5, dim=-1)
    torch.testing.assert_close(out.top_logprobs_values, vals)
    assert torch.equal(out.top_logprobs_ids, ids)
    assert (out.top_logprobs_values[:, :-1] >= out.top_logprobs_values[:, 1:]).all()


def test_greedy_logprobs_without_top():
    logits = torch.randn(3, V)
    out = sample([make_req(i, temperature=0.0, return_logprob=True) for i in range(3)], logits)
    assert torch.equal(out.next_token_ids, logits.argmax(-1))
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1).max(-1).values)
    assert out.top_logprobs_ids is None


def test_compute_prompt_logprobs():
    logits = torch.randn(7, V)
    targets = torch.randint(0, V, (7,))
    lp, top_ids, top_vals = compute_prompt_logprobs(logits, targets, top_k=2)
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(lp, raw[torch.arange(7), targets])
    assert torch.equal(top_ids, raw.topk(2).indices)
    assert compute_prompt_logprobs(logits, targets).top_ids is None


# ---------------------------------------------------------------- no host syncs
def test_sample_never_syncs_with_the_host(monkeypatch):
    rng = random.Random(3)
    reqs = [_random_other_req(rng, rng.randrange(10)) for _ in range(16)]
    reqs.append(make_req(1, min_new_tokens=5, eos=(0,), return_logprob=True,
                         top_logprobs_num=4))
    sb = SamplingBatch.from_reqs(reqs, V).to(CPU)
    logits = torch.randn(len(reqs), V)

    def forbidden(*a, **k):
        raise AssertionError("host sync inside Sampler.sample")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = Sampler().sample(logits, sb)
    monkeypatch.undo()
    assert out.next_token_ids.shape == (len(reqs),)


# ---------------------------------------------------------------- the running set's arrays
@pytest.mark.parametrize("mix", ["greedy", "sampled", "mixed", "slow"])
def test_batch_from_running_set_equals_batch_from_requests(mix):
    """SamplingBatch.from_running (arrays written at admission, rows gathered per step)
    builds the same batch as from_reqs and samples the same tokens."""
    from asgl.engine.scheduler.running_set import RunningSet

    params = {
        "greedy": [dict(temperature=0.0)] * 4,
        "sampled": [dict(temperature=0.7, top_p=0.9), dict(temperature=1.2, top_k=5, seed=3),
                    dict(temperature=0.5, min_p=0.1), dict(temperature=1.0)],
        "mixed": [dict(temperature=0.0), dict(temperature=0.9, top_k=10),
                  dict(temperature=0.0, seed=4), dict(temperature=0.8, top_p=0.5, seed=9)],
        "slow": [dict(temperature=0.8, repetition_penalty=1.3), dict(temperature=0.0,
                 logit_bias={"7": 5.0}), dict(temperature=0.9, min_new_tokens=3),
                 dict(temperature=0.6, frequency_penalty=0.5)],
    }[mix]
    reqs = [Req(rid=f"r{i}", prompt_ids=[1, 2, 3], sampling=SamplingParams(**p), seed=10 + i,
                eos_ids=frozenset((1,)), return_logprob=(i == 3),
                top_logprobs_num=2 if i == 3 else 0, output_ids=[5, 6][:i])
            for i, p in enumerate(params)]
    running = RunningSet(16, V)
    rows = [11, 2, 7, 0]
    for req, row in zip(reqs, rows):
        req.req_pool_idx = row
        running.admit(req)
    running.check(reqs)
    steps = [len(r.output_ids) for r in reqs]
    import numpy as np
    a = SamplingBatch.from_running(running, np.array(rows), np.array(steps), reqs).to(CPU)
    b = SamplingBatch.from_reqs(reqs, V).to(CPU)
    for name in ("all_greedy", "seeded", "return_logprob", "top_logprobs_num"):
        assert getattr(a, name) == getattr(b, name), name
    for name in SamplingBatch._TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name
    assert (a.penalties is None) == (b.penalties is None) and (a.edits is None) == (b.edits is None)
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    assert torch.equal(Sampler().sample(logits, a).next_token_ids,
                       Sampler().sample(logits, b).next_token_ids)
    # a changed row is caught
    running.temperature[rows[1]] += 0.5
    if not reqs[1].sampling.is_greedy:
        with pytest.raises(AssertionError, match="running-set row"):
            running.check(reqs)
