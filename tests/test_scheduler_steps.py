"""The scheduler driven step by step against a fake runner that returns scripted token ids,
with exact assertions on each step's plan, slots, table rows and retraction.

A plan is written as (rid, first position, new tokens) per request, in batch order. Slots
come off the free list from its top: a fresh pool of capacity C hands out C-n+1..C first.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest

from asgl.engine.contracts.outputs import FinishReason
from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.engine.contracts.step import StepOutput
from asgl.engine.loop.output_processor import apply_step_output
from asgl.engine.scheduler.memory import KVMemory
from asgl.engine.scheduler.policy import order_waiting
from asgl.engine.scheduler.req import Req, ReqState
from asgl.engine.scheduler.scheduler import NEED_DRAIN, ScheduledBatch, Scheduler

CONTEXT = 64


class FakeRunner:
    """The k-th token sampled for request `rid` is `script[rid][k]` (default 500 + k).

    Called when a step is submitted, as the engine submits it: the output index a row
    samples is then len(output_ids) + tokens still in flight (the SamplingBatch offset)."""

    def __init__(self, script: Optional[dict[str, list[int]]] = None):
        self.script = script or {}

    def step(self, batch: ScheduledBatch) -> StepOutput:
        ids = []
        for req in batch.sampling_reqs:
            k = len(req.output_ids) + req.num_inflight - 1
            seq = self.script.get(req.rid, [])
            ids.append(seq[k] if k < len(seq) else 500 + k)
        return StepOutput(next_ids=ids)


class Harness:
    def __init__(self, *, capacity: int = 64, max_running: int = 8, chunk: int = 64,
                 script: Optional[dict[str, list[int]]] = None):
        self.memory = KVMemory(capacity, max_running, CONTEXT)
        self.sched = Scheduler(memory=self.memory, max_running=max_running, chunk_size=chunk,
                               max_prefill_tokens=chunk, context_len=CONTEXT, policy="fcfs",
                               check_integrity=True)
        self.runner = FakeRunner(script)
        self.clock = 0.0
        self.submitted: dict[int, StepOutput] = {}

    def add(self, rid: str, prompt: list[int], max_new: int = 4) -> Req:
        self.clock += 1.0
        req = Req(rid=rid, prompt_ids=list(prompt), seed=0, arrival_time=self.clock,
                  sampling=SamplingParams(max_new_tokens=max_new, ignore_eos=True))
        self.sched.add(req)
        return req

    def schedule(self, allow_retract: bool = True):
        """Schedule and submit the next step (its results are applied by `finish`)."""
        batch = self.sched.schedule(allow_retract=allow_retract)
        if isinstance(batch, ScheduledBatch):
            self.submitted[id(batch)] = self.runner.step(batch)
        return batch

    def finish(self, batch: ScheduledBatch) -> None:
        apply_step_output(batch, self.submitted.pop(id(batch)), CONTEXT)
        self.sched.finish_step(batch)

    def step(self) -> ScheduledBatch:
        batch = self.schedule()
        assert isinstance(batch, ScheduledBatch), batch
        self.finish(batch)
        return batch

    def row(self, req: Req) -> list[int]:
        """req's table row over its computed positions (its KV slots)."""
        return self.memory.req_to_token[req.req_pool_idx, :req.num_computed].tolist()


def plan(batch: ScheduledBatch) -> list[tuple[str, int, int]]:
    f = batch.forward
    return [(r.rid, p, e) for r, p, e in zip(batch.reqs, f.prefix_lens_cpu, f.extend_lens_cpu)]


def sampled(batch: ScheduledBatch) -> list[str]:
    return [r.rid for r in batch.sampling_reqs]


def slots(batch: ScheduledBatch) -> list[int]:
    return batch.forward.out_cache_loc.tolist()


def span(lo: int, hi: int) -> list[int]:
    return list(range(lo, hi + 1))


# ---------------------------------------------------------------------- admission
def test_prefill_then_decode_growth_slot_by_slot():
    h = Harness(capacity=32)
    a = h.add("a", [11, 12, 13, 14, 15], max_new=3)
    b = h.step()
    assert plan(b) == [("a", 0, 5)] and sampled(b) == ["a"]
    assert b.forward.input_ids.tolist() == [11, 12, 13, 14, 15]
    assert b.forward.positions.tolist() == [0, 1, 2, 3, 4]
    assert slots(b) == span(28, 32)
    assert a.output_ids == [500]
    b = h.step()  # decode: the newest token at position 5, one new slot
    assert plan(b) == [("a", 5, 1)] and b.forward.input_ids.tolist() == [500]
    assert slots(b) == [27] and h.row(a) == span(28, 32) + [27]
    b = h.step()
    assert plan(b) == [("a", 6, 1)] and slots(b) == [26]
    assert a.output_ids == [500, 501, 502] and a.finish_reason.kind == "length"
    assert a.state == ReqState.FINISHED and h.sched.running == []
    # prompt + the two computed outputs stay cached; the slot of a never-computed
    # position does not exist: 32 - 7 are free
    assert h.memory.cached_tokens() == 7 and h.memory.available() == 25
    assert h.sched.is_idle_and_clean()


def test_admission_with_a_prefix_hit_reuses_the_cached_slots():
    h = Harness(capacity=32)
    a = h.add("a", [1, 2, 3, 4, 5, 6], max_new=1)
    assert slots(h.step()) == span(27, 32) and a.finished
    b = h.add("b", [1, 2, 3, 4, 5, 6, 7, 8], max_new=1)
    batch = h.schedule()
    # 6 tokens hit the cache: only [7, 8] are computed, into fresh slots
    assert plan(batch) == [("b", 6, 2)] and batch.forward.input_ids.tolist() == [7, 8]
    assert slots(batch) == [25, 26]
    assert b.num_cached == 6 and h.row(b) == span(27, 32) + [25, 26]
    h.finish(batch)
    assert h.sched.stats.cached_tokens == 6 and h.sched.stats.prompt_tokens == 14
    # a whole-prompt hit still computes the last prompt token (its logits are sampled)
    c = h.add("c", [1, 2, 3, 4, 5, 6], max_new=1)
    batch = h.step()
    assert plan(batch) == [("c", 5, 1)] and sampled(batch) == ["c"] and c.num_cached == 5


def test_siblings_admitted_together_compute_a_shared_prefix_once():
    h = Harness(capacity=64)
    prompt = list(range(100, 120))  # 20 tokens: above the 16-token sharing threshold
    h.add("x", prompt + [1], max_new=1)
    h.add("y", prompt + [2], max_new=1)
    first = h.step()
    assert plan(first) == [("x", 0, 21)]  # y waits a step for x's published prefix
    second = h.step()
    assert plan(second) == [("y", 20, 1)]


# ---------------------------------------------------------------------- chunked prefill
def test_chunked_prefill_beside_decodes():
    h = Harness(capacity=64, chunk=4)
    a = h.add("a", [1, 2, 3], max_new=5)
    assert plan(h.step()) == [("a", 0, 3)]
    b = h.add("b", [21, 22, 23, 24, 25, 26, 27, 28, 29, 30], max_new=1)
    steps = [h.step() for _ in range(3)]
    # decodes take no budget; the 10-token prompt goes in chunks of 4, 4, 2 and samples
    # only with its last chunk
    assert [plan(s) for s in steps] == [[("a", 3, 1), ("b", 0, 4)],
                                        [("a", 4, 1), ("b", 4, 4)],
                                        [("a", 5, 1), ("b", 8, 2)]]
    assert [sampled(s) for s in steps] == [["a"], ["a"], ["a", "b"]]
    assert steps[1].forward.input_ids.tolist() == [501, 25, 26, 27, 28]
    assert b.output_ids == [500] and b.finished
    assert a.output_ids == [500, 501, 502, 503]
    # the chunks were published as they went: b's prompt is cached in full
    assert h.memory.match(Req(rid="q", prompt_ids=b.prompt_ids, seed=0,
                              sampling=SamplingParams()), 10, peek=True).length == 10


# ---------------------------------------------------------------------- overlap
def test_overlap_feeds_placeholders_for_tokens_in_flight():
    h = Harness(capacity=32, script={"a": [7, 8, 9, 10]})
    a = h.add("a", [1, 2, 3], max_new=4)
    first = h.schedule()
    assert plan(first) == [("a", 0, 3)]
    second = h.schedule(allow_retract=False)  # scheduled before the first step's results
    assert plan(second) == [("a", 3, 1)]
    assert second.forward.input_ids.tolist() == [-1]  # "row 0 of the previous step"
    assert second.forward.extra["placeholders"] is True
    assert a.num_inflight == 2 and a.inflight_steps == 2
    h.finish(first)
    assert a.output_ids == [7] and a.num_inflight == 1
    h.finish(second)
    assert a.output_ids == [7, 8]
    third = h.step()
    assert third.forward.input_ids.tolist() == [8]  # known now: no placeholder
    assert third.forward.extra["placeholders"] is False


# ---------------------------------------------------------------------- retraction
def test_retraction_under_a_tiny_pool():
    # 14 slots: two 4-token prompts, then 2 slots per decode step fill the pool in 3 steps
    h = Harness(capacity=14)
    a = h.add("a", [1, 2, 3, 4], max_new=6)
    b = h.add("b", [5, 6, 7, 8], max_new=6)
    steps = [h.step() for _ in range(4)]
    assert [plan(s) for s in steps] == [[("a", 0, 4), ("b", 0, 4)], [("a", 4, 1), ("b", 4, 1)],
                                        [("a", 5, 1), ("b", 5, 1)], [("a", 6, 1), ("b", 6, 1)]]
    assert [slots(s) for s in steps] == [span(7, 14), [5, 6], [3, 4], [1, 2]]
    assert h.memory.available() == 0 and b.output_ids == [500, 501, 502, 503]
    # with a step in flight the scheduler cannot retract (it needs the real tokens)
    assert h.schedule(allow_retract=False) == NEED_DRAIN
    batch = h.step()
    # b arrived last, so b is retracted: its 7 computed tokens go into the cache (its
    # private tail, slots 6, 4, 2, becomes the unlocked leaf [500, 501, 502]), and evicting
    # that leaf makes room for a's next token
    assert plan(batch) == [("a", 7, 1)] and sampled(batch) == ["a"] and slots(batch) == [2]
    assert b.state == ReqState.WAITING and h.sched.waiting == [b]
    assert b.num_retractions == 1 and h.sched.stats.num_retractions == 1
    assert b.req_pool_idx is None and b.cache_node is None and b.num_computed == 0
    assert b.output_ids == [500, 501, 502, 503]  # kept: it resumes where it stopped
    assert h.row(a) == [7, 8, 9, 10, 5, 3, 1, 2]
    assert h.memory.available() == 2  # slots 6 and 4
    assert h.memory.cache.evictable_size() == 4  # b's prompt [5, 6, 7, 8], slots 11..14
    assert h.memory.cache.protected_size() == 4  # a's prompt, locked by a
    # b waits while admitting it would soon force another retraction; a finishes
    batch = h.step()
    assert plan(batch) == [("a", 8, 1)] and slots(batch) == [4] and a.finished
    assert a.output_ids == [500, 501, 502, 503, 504, 505]
    # b resumes: its cached prompt is a hit, its 4 outputs so far are computed again, and
    # it samples its 5th token
    batch = h.step()
    assert plan(batch) == [("b", 4, 4)] and sampled(batch) == ["b"]
    assert batch.forward.input_ids.tolist() == [500, 501, 502, 503]
    assert h.row(b)[:4] == span(11, 14)
    h.step()
    assert b.output_ids == [500, 501, 502, 503, 504, 505] and b.finished
    assert h.sched.is_idle_and_clean()


# ---------------------------------------------------------------------- abort
def test_abort_mid_chunk_frees_at_once_when_no_step_uses_it():
    h = Harness(capacity=32, chunk=4)
    a = h.add("a", list(range(40, 50)), max_new=2)
    batch = h.step()
    assert plan(batch) == [("a", 0, 4)] and sampled(batch) == []
    assert h.memory.available() == 28
    h.sched.abort(a)
    assert a.finish_reason == FinishReason("abort", message="aborted")
    assert a.state == ReqState.FINISHED and h.sched.running == []
    # the 4 computed prompt tokens stay cached but unlocked; everything else is free
    assert h.memory.available() == 28 and h.memory.cached_tokens() == 4
    assert h.memory.cache.evictable_size() == 4 and h.memory.rows_available() == 8
    assert h.schedule() is None
    assert h.sched.is_idle_and_clean()


def test_abort_with_its_chunk_in_flight_frees_after_that_step():
    h = Harness(capacity=32, chunk=4)
    a = h.add("a", list(range(40, 50)), max_new=2)
    h.step()
    batch = h.schedule()
    assert plan(batch) == [("a", 4, 4)]
    h.sched.abort(a)
    # the step may still write a's KV: nothing is released yet
    assert h.sched.running == [a] and a.req_pool_idx is not None
    assert h.memory.available() == 24
    h.finish(batch)
    assert h.sched.running == [] and a.state == ReqState.FINISHED and a.output_ids == []
    assert h.memory.available() == 24 and h.memory.cached_tokens() == 8
    assert h.memory.cache.evictable_size() == 8
    assert h.sched.is_idle_and_clean()


def test_abort_while_waiting():
    h = Harness(capacity=32, max_running=1)
    h.add("a", [1, 2, 3], max_new=3)
    b = h.add("b", [4, 5, 6], max_new=3)
    assert plan(h.step()) == [("a", 0, 3)]  # one row: b waits
    h.sched.abort(b)
    assert h.sched.waiting == [] and b.finished and b.req_pool_idx is None


def test_memory_ordering_rules_are_enforced():
    h = Harness(capacity=16)
    a = h.add("a", [1, 2, 3], max_new=3)
    batch = h.schedule()
    with pytest.raises(AssertionError, match="a step uses it"):
        h.memory.release(a)  # its step is in flight
    with pytest.raises(AssertionError, match="a step uses it"):
        h.memory.rollback(a, 1)
    h.finish(batch)
    with pytest.raises(AssertionError, match="reserved"):
        h.memory.extend(np.array([a.req_pool_idx] * 2), np.array([3, 4]))


def test_queue_is_ordered_only_when_something_can_be_admitted():
    h = Harness(capacity=64, max_running=1)
    h.sched.policy = "lpm"
    calls = []
    match = h.memory.match
    h.memory.match = lambda req, n, peek=False: calls.append((req.rid, peek)) or match(
        req, n, peek=peek)
    a = h.add("a", [1, 2, 3], max_new=4)
    for rid in "bcd":
        h.add(rid, [4, 5, 6, 7], max_new=1)
    h.step()  # a admitted (a queue of 4: ordered once, each peeked)
    assert a.state == ReqState.RUNNING
    assert sorted(c for c in calls if c[1]) == [(r, True) for r in "abcd"]
    calls.clear()
    for _ in range(3):  # a decodes; no row is free: no peek at all
        h.step()
    assert calls == []
    h.step()  # a finished: its tokens changed the tree, so b, c, d are peeked again
    assert sorted(c for c in calls if c[1]) == [(r, True) for r in "bcd"]
    # while the tree is unchanged, ordering again reuses the peeks (b's admission above
    # published its prompt, so the first order peeks c and d once more)
    for expected in ([("c", True), ("d", True)], []):
        calls.clear()
        h.sched.waiting = order_waiting(h.sched.waiting, "lpm", h.sched._peek, h.sched._rng)
        assert sorted(c for c in calls if c[1]) == expected
