"""Engine behaviour on the embedded model: batching invariance, memory pressure, bad input."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from asgl.engine.contracts.errors import InvalidRequest
from tests.conftest import make_llm, run_on

PROMPTS = [f"Story {i}: The {w} walked into the" for i, w in enumerate(
    ["cat", "robot", "old king", "tiny mouse", "astronaut", "painter", "dragon", "child",
     "farmer", "ghost", "teacher", "pirate"])]


@pytest.fixture(scope="module")
def llm():
    engine = make_llm()
    yield engine
    engine.shutdown()


def test_seeded_sample_same_alone_and_in_batch(llm):
    params = {"temperature": 0.8, "seed": 1234, "max_new_tokens": 20}
    alone = llm.generate(PROMPTS[0], params)
    others = [{"temperature": 0.8, "seed": 99 + i, "max_new_tokens": 12 + i} for i in range(5)]

    async def batch():
        mine = asyncio.create_task(llm.engine.generate(PROMPTS[0], params))
        rest = [asyncio.create_task(llm.engine.generate(p, sp))
                for p, sp in zip(PROMPTS[1:], others)]
        await asyncio.gather(*rest)
        return await mine

    inside = run_on(llm, batch())
    assert inside.output_ids == alone.output_ids
    different_seed = llm.generate(PROMPTS[0], dict(params, seed=4321))
    assert different_seed.output_ids != alone.output_ids


def test_k_requests_take_at_most_n_plus_k_steps(llm):
    sched = llm.engine.scheduler
    n, k = 10, 6
    before = sched.stats.num_steps
    outs = llm.generate(PROMPTS[:k], {"temperature": 0, "max_new_tokens": n,
                                      "ignore_eos": True})
    assert all(len(o.output_ids) == n for o in outs)
    assert sched.stats.num_steps - before <= n + k


def test_n_choices_and_stop_strings(llm):
    outs = llm.generate(PROMPTS[1], {"temperature": 1.0, "n": 3, "seed": 7,
                                     "max_new_tokens": 8})
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.output_ids) for o in outs}) > 1
    full = llm.generate(PROMPTS[2], {"temperature": 0, "max_new_tokens": 24})
    words = full.text.split()
    assert len(words) > 3
    stop = words[2]
    cut = llm.generate(PROMPTS[2], {"temperature": 0, "max_new_tokens": 24, "stop": [stop]})
    assert cut.finish_reason == {"type": "stop", "matched": stop}
    assert stop not in cut.text and full.text.startswith(cut.text)


def test_logprobs(llm):
    out = llm.generate(PROMPTS[3], {"temperature": 0, "max_new_tokens": 4},
                       return_logprob=True, logprob_start_len=0, top_logprobs_num=3)
    assert len(out.output_token_logprobs) == 4
    for (lp, tok), top in zip(out.output_token_logprobs, out.output_top_logprobs):
        assert top[0][1] == tok and abs(top[0][0] - lp) < 1e-5  # greedy = top-1
        assert top[0][0] >= top[1][0] >= top[2][0]
    assert out.input_token_logprobs[0][0] is None
    assert len(out.input_token_logprobs) == out.prompt_tokens
    assert all(lp <= 0 for lp, _ in out.input_token_logprobs[1:])


def test_prompt_logprobs_do_not_depend_on_the_cache(llm):
    prompt = PROMPTS[6] + " and then they all went home"
    params = {"temperature": 0, "max_new_tokens": 1}
    llm.engine.flush_cache()
    cold = llm.generate(prompt, params, return_logprob=True, logprob_start_len=5)
    warm = llm.generate(prompt, params, return_logprob=True, logprob_start_len=5)
    assert warm.cached_tokens > 0
    assert [t for _, t in warm.input_token_logprobs] == [t for _, t in cold.input_token_logprobs]
    for (a, _), (b, _) in zip(warm.input_token_logprobs, cold.input_token_logprobs):
        assert abs(a - b) < 1e-4


def test_max_new_tokens_zero_gives_prompt_logprobs_only(llm):
    out = llm.generate(PROMPTS[3], {"max_new_tokens": 0}, return_logprob=True,
                       logprob_start_len=0)
    assert out.output_ids == [] and out.finish_reason["type"] == "length"
    assert len(out.input_token_logprobs) == out.prompt_tokens


@pytest.fixture(scope="module")
def good(llm):
    """The greedy output of PROMPTS[4] alone: what it must stay while bad input arrives
    (computed once for every bad input below; greedy, so the same each time)."""
    return llm.generate(PROMPTS[4], {"temperature": 0, "max_new_tokens": 16})


@pytest.mark.parametrize("bad, param", [
    (dict(prompt=""), "text"),
    (dict(prompt="hello " * 9000), "text"),
    (dict(prompt="hi", sampling_params={"max_new_tokens": -1}), "max_new_tokens"),
    (dict(prompt="hi", sampling_params={"top_p": 1.5}), "top_p"),
    (dict(prompt="hi", sampling_params={"top_p": 0.0}), "top_p"),
    (dict(prompt="hi", sampling_params={"temperature": "hot"}), "sampling_params"),
    (dict(input_ids=[1, 2, 10**9]), "input_ids"),
    (dict(prompt="hi", sampling_params={"stop": [""]}), "stop"),
])
def test_bad_input_is_rejected_and_harms_nothing(llm, good, bad, param):
    engine = llm.engine

    async def scenario():
        running = asyncio.create_task(
            engine.generate(PROMPTS[4], {"temperature": 0, "max_new_tokens": 16}))
        await asyncio.sleep(0.05)
        with pytest.raises(InvalidRequest) as err:
            await engine.generate(bad.get("prompt"), bad.get("sampling_params"),
                                  input_ids=bad.get("input_ids"))
        return err.value, await running

    err, out = run_on(llm, scenario())
    assert err.param == param and str(err)
    assert out.output_ids == good.output_ids


def test_abort_frees_memory(llm):
    engine = llm.engine

    async def scenario():
        task = asyncio.create_task(engine.generate(PROMPTS[5], {"max_new_tokens": 400,
                                                                "ignore_eos": True}))
        while not any(r.output_ids for r in engine.scheduler.running):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not engine.scheduler.running:
                break
            await asyncio.sleep(0.01)

    run_on(llm, scenario())
    assert llm.engine.scheduler.is_idle_and_clean()


def test_stress_more_requests_than_the_pool_holds():
    """A pool too small for all requests at once: retraction happens, outputs don't change.

    The reference is the same requests without memory pressure, on a twin engine (same
    options) in groups of 5 (5 x (~10 + 40) tokens fit the 260-token pool; no retraction
    there is asserted): 80 decode steps instead of 400 one request at a time, run while
    the pressured engine works (each engine's steps keep about one core busy)."""
    prompts = PROMPTS[:10]
    params = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    options = dict(max_total_tokens=260, max_running_requests=8, chunked_prefill_size=32)
    small = make_llm(**options)
    try:
        twin = make_llm(**options)
        try:
            with ThreadPoolExecutor(1) as pool:
                reference = pool.submit(_unpressured_run, twin, prompts, params)
                together = small.generate(prompts, params)
                unpressured = reference.result()
        finally:
            twin_retractions = twin.engine.scheduler.stats.num_retractions
            twin.shutdown()
        assert twin_retractions == 0  # the reference saw no memory pressure
        assert small.engine.scheduler.stats.num_retractions > 0
        for i, out in enumerate(together):
            assert out.output_ids == unpressured[i], \
                f"request {i} changed under memory pressure"
        sched = small.engine.scheduler
        assert sched.is_idle_and_clean()
        assert small.engine.memory.flush()
        assert small.engine.memory.available() == small.engine.memory.capacity
    finally:
        small.shutdown()


def _unpressured_run(twin, prompts: list[str], params: dict) -> list[list[int]]:
    """The prompts' outputs in groups of 5, which fit the twin's pool together."""
    outs = []
    for start in range(0, len(prompts), 5):
        outs += [o.output_ids for o in twin.generate(prompts[start:start + 5], params)]
    return outs
