"""RadixAttention in the engine: identical greedy outputs with and without the prefix cache,
for several chunk sizes, under retraction; cache hits for in-flight prefixes; mixed batches.

The property test runs on the tiny random-weight Llama preset (fast); the hit and mixing
tests on the embedded SmolLM2.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgl.engine.contracts.forward_batch import ForwardMode
from tests.conftest import make_llm, run_on

TINY = dict(model_path="tiny-llama", load_format="dummy", random_seed=0)

CONFIGS = {
    # the reference: no cache, whole prompts, no overlap, plenty of memory
    "plain": dict(disable_radix_cache=True, chunked_prefill_size=-1,
                  disable_overlap_schedule=True),
    "radix+chunk8": dict(chunked_prefill_size=8),
    "radix+chunk32+small-pool": dict(chunked_prefill_size=32, max_total_tokens=300,
                                     max_running_requests=6),
    "radix+no-overlap+lof": dict(disable_overlap_schedule=True, schedule_policy="lof",
                                 chunked_prefill_size=16),
}


@pytest.fixture(scope="module")
def engines():
    llms = {name: make_llm(**TINY, **opts) for name, opts in CONFIGS.items()}
    yield llms
    for llm in llms.values():
        llm.shutdown()


async def _run_workload(engine, workload):
    """Submit (delay_steps, ids, max_new) requests with staggered arrival; return outputs."""
    async def one(delay, ids, max_new):
        await asyncio.sleep(delay * 0.003)
        out = await engine.generate(input_ids=ids, sampling_params={
            "temperature": 0, "max_new_tokens": max_new, "ignore_eos": True})
        return out.output_ids
    return await asyncio.gather(*(one(*w) for w in workload))


@st.composite
def workloads(draw):
    rng = random.Random(draw(st.integers(0, 10**6)))
    prefixes = [[rng.randrange(3, 49152) for _ in range(rng.randint(1, 60))]
                for _ in range(draw(st.integers(1, 3)))]
    reqs = []
    for _ in range(draw(st.integers(1, 10))):
        base = rng.choice(prefixes)
        cut = rng.randint(1, len(base))
        tail = [rng.randrange(3, 49152) for _ in range(rng.randint(0, 20))]
        reqs.append((rng.randint(0, 5), base[:cut] + tail, rng.randint(1, 24)))
    return reqs


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(workload=workloads())
def test_greedy_identical_with_and_without_cache(engines, workload):
    results = {name: run_on(llm, _run_workload(llm.engine, workload))
               for name, llm in engines.items()}
    reference = results["plain"]
    for name, outs in results.items():
        assert outs == reference, f"{name} differs from the cache-less reference"
    for llm in engines.values():
        sched = llm.engine.scheduler
        assert not sched.running and not sched.waiting
        # free + cached == capacity: nothing leaked
        assert llm.engine.memory.available() + llm.engine.memory.cached_tokens() \
            == llm.engine.memory.capacity


def test_small_pool_config_really_retracts(engines):
    llm = engines["radix+chunk32+small-pool"]
    before = llm.engine.scheduler.stats.num_retractions
    prompts = [[5 + i] * 30 for i in range(6)]
    outs = run_on(llm, _run_workload(llm.engine, [(0, p, 40) for p in prompts]))
    assert all(len(o) == 40 for o in outs)
    assert llm.engine.scheduler.stats.num_retractions > before


@pytest.fixture(scope="module")
def smol():
    llm = make_llm(chunked_prefill_size=16)
    yield llm
    llm.shutdown()


def test_prefix_of_a_decoding_request_is_reported_cached(smol):
    engine = smol.engine
    base = "You are a helpful assistant. Answer briefly and precisely. " * 3

    async def scenario():
        first = asyncio.create_task(engine.generate(base + "Question one?", {
            "max_new_tokens": 64, "ignore_eos": True}))
        while not any(r.output_ids for r in engine.scheduler.running):
            await asyncio.sleep(0.005)
        second = await engine.generate(base + "Question two?", {"max_new_tokens": 2})
        still_running = not first.done()
        await first
        return second, still_running

    second, still_running = run_on(smol, scenario())
    shared = len(engine.tokenize(base))
    assert still_running
    assert second.cached_tokens >= shared - 1


def test_prefill_chunk_and_decodes_share_a_forward_batch(smol):
    engine = smol.engine
    modes = []
    original = engine.scheduler._build

    def spy(plan):
        batch = original(plan)
        modes.append((batch.forward.mode, sorted(batch.forward.extend_lens_cpu)))
        return batch

    async def scenario():
        engine.scheduler._build = spy
        try:
            decoding = asyncio.create_task(engine.generate("Count: one, two,", {
                "max_new_tokens": 40, "ignore_eos": True}))
            while not any(r.output_ids for r in engine.scheduler.running):
                await asyncio.sleep(0.005)
            await engine.generate("A long document. " * 20, {"max_new_tokens": 1})
            await decoding
        finally:
            del engine.scheduler._build

    run_on(smol, scenario())
    mixed = [lens for mode, lens in modes if mode == ForwardMode.MIXED]
    assert mixed, f"no mixed batch among {modes}"
    assert any(lens[0] == 1 and lens[-1] == 16 for lens in mixed)


def test_flush_cache_only_when_idle(smol):
    smol.generate("Some text to cache", {"max_new_tokens": 2})
    engine = smol.engine
    assert engine.memory.cached_tokens() > 0
    assert engine.memory.flush()
    assert engine.memory.available() == engine.memory.capacity
