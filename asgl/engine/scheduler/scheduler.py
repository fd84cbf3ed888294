"""Scheduler: decides, each step, which tokens of which requests the next forward pass computes.

It schedules tokens, not phases: every request has `fill_ids` (prompt + output) and
`num_computed`; a step gives each scheduled request `extend` new tokens. A decode is
extend == 1; a prefill chunk, a prefix-cache hit or a resumed (retracted) request is just
a larger extend starting at a later position. So K concurrent requests of N new tokens
each take at most N + K forward passes.

Batch types and owners: the scheduler owns `ScheduledBatch` (CPU: which requests, how
many tokens, which rows sample); its `forward` field is the `ForwardBatch` with host
tensors that the model runner moves to the device in the worker thread.

Overlap: with one step in flight, the next step is scheduled before the in-flight
results are known. A request whose last token is still in flight gets a placeholder id
(-1 - k: "the token sampled for row k of the previous step"), resolved on the device.
Anything that must see the real tokens (retraction) asks the driver to drain first
(`schedule` returns `NEED_DRAIN`).

Memory goes through one interface, `KVMemory` (memory.py): admit with a prefix match,
reserve, extend rows at positions, publish, release, roll back. When a step's tokens do
not fit, unlocked cached prefixes are evicted first; then the running request that
arrived last is retracted (its computed tokens stay cached): it goes back to the front of
the queue with its output so far and later resumes where it stopped.

Policies (which waiting request is considered first) are in policy.py.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from asgl.engine.contracts.forward_batch import ForwardBatch, ForwardMode
from asgl.engine.contracts.outputs import FinishReason
from asgl.engine.scheduler.memory import KVMemory
from asgl.engine.scheduler.policy import order_waiting
from asgl.engine.scheduler.req import Req, ReqState
from asgl.engine.scheduler.running_set import RunningSet

if TYPE_CHECKING:
    from asgl.engine.scheduler.radix_cache import MatchResult

logger = logging.getLogger(__name__)

NEED_DRAIN = "need_drain"
# A waiting request sharing this many not-yet-cached tokens with one admitted in the same
# step waits one step and then hits the cache instead of computing them again.
SHARED_PREFIX_MIN = 16


@dataclass
class ScheduledBatch:
    """One step as the scheduler planned it (host only): `forward` is the ForwardBatch of
    host tensors the worker uploads; the rest is what the loop needs to apply results."""

    reqs: list[Req]
    sampling_reqs: list[Req]
    # the sampling requests' running-set rows and the output index each samples
    sample_table_rows: np.ndarray
    sample_steps: np.ndarray
    # (req, first prompt position scored, count, offset in the step's prompt logprobs)
    prompt_lp_spans: list[tuple[Req, int, int, int]]
    forward: ForwardBatch
    decode_only: bool = False


@dataclass
class SchedulerStats:
    num_steps: int = 0
    num_forward_tokens: int = 0
    num_retractions: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0


def _shares_uncached_prefix(key: list[int], cached: int,
                            admitted: list[tuple[Req, int]]) -> bool:
    """Whether `key` shares at least SHARED_PREFIX_MIN uncached tokens with a request
    admitted in this step (n > 1 siblings, identical prompts arriving together)."""
    if len(key) - cached < SHARED_PREFIX_MIN:
        return False
    probe = key[cached:cached + SHARED_PREFIX_MIN]
    return any(r.key_ids[cached:cached + SHARED_PREFIX_MIN] == probe for r, _ in admitted)


def _known_ids(req: Req, start: int, n: int) -> list[int]:
    """req.fill_ids[start:start + n] without building fill_ids (O(n), not O(seq_len):
    a decode step asks this of every running request)."""
    p = len(req.prompt_ids)
    if start >= p:
        return req.output_ids[start - p:start - p + n]
    if start + n <= p:
        return req.prompt_ids[start:start + n]
    return req.prompt_ids[start:] + req.output_ids[:start + n - p]


class Scheduler:
    def __init__(self, *, memory: KVMemory, max_running: int, chunk_size: int,
                 max_prefill_tokens: int, context_len: int, policy: str = "lpm",
                 check_integrity: bool = False, seed: int = 0,
                 vocab_size: Optional[int] = None):
        self.memory = memory
        # sampling parameters by table row, written at admission (running_set.py)
        self.running_set = RunningSet(memory.num_rows, vocab_size or (1 << 31) - 1)
        # waiting request -> its peek match, valid while the tree's version is unchanged
        self._peek_cache: dict[tuple[int, int], tuple[Req, "MatchResult"]] = {}
        self._peek_version = -1
        self.max_running = max_running
        self.chunk_size = chunk_size
        self.max_prefill_tokens = max_prefill_tokens
        self.context_len = context_len
        self.policy = policy
        self.check = check_integrity
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.stats = SchedulerStats()
        self._rng = random.Random(seed)
        # Expected share of each running request's remaining max_new_tokens that will
        # really be used; admission keeps that much room free (SGLang's new_token_ratio).
        self.new_token_ratio = 0.5
        self._min_ratio, self._ratio_decay = 0.1, 0.002
        # Jump-forward (asgl/engine/jump_forward.py), set by the engine: appends a request's
        # grammar-forced tokens and returns how many leading fill tokens kept their KV.
        self.jump_forward: Optional[Callable[[Req], Optional[int]]] = None

    # ------------------------------------------------------------------ queue
    def add(self, req: Req) -> None:
        req.state = ReqState.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, req: Req) -> None:
        """Finish `req` as aborted; its memory is released as soon as no step uses it."""
        if req.finished:
            return
        req.finish_reason = FinishReason("abort", message="aborted")
        if req.state == ReqState.WAITING:  # (a retracted one still has cached tokens)
            self.waiting.remove(req)
            self._release(req)
        elif req.inflight_steps == 0:  # else finish_step releases it after its last step
            self.running.remove(req)
            self._release(req)

    # ------------------------------------------------------------------ schedule
    def schedule(self, allow_retract: bool = True):
        """The next ScheduledBatch, None when there is nothing to run, or NEED_DRAIN."""
        plan: list[tuple[Req, int]] = []  # (req, extend)
        budget = self.chunk_size
        # 1. running requests: one decode token each, or their next prefill chunk.
        for req in list(self.running):
            if req.finish_reason is not None:
                continue
            if req.grammar is not None and req.grammar.jump_pending and self.jump_forward:
                if req.inflight_steps:
                    continue  # its in-flight token lands first; it jumps in a later step
                self._jump_forward(req)
                if req.finished:  # a stop string or the length limit inside the jump
                    self.running.remove(req)
                    self._release(req)
                    continue
            produced = len(req.output_ids) + req.num_inflight
            pending = len(req.prompt_ids) + produced - req.num_computed
            if pending <= 0 or produced >= req.max_new_tokens:
                continue  # its last token is still being processed
            if pending == 1 and produced > 0:
                plan.append((req, 1))
            elif budget > 0:
                take = min(pending, budget)
                budget -= take
                plan.append((req, take))
        need = sum(n for _, n in plan)
        if need and not self.memory.reserve(need):
            if not allow_retract:
                return NEED_DRAIN
            plan = self._retract_until_fits(plan)
            need = sum(n for _, n in plan)
            if not plan and not self.waiting:
                return None
        # 2. admit waiting requests while the budget, the rows and the memory allow.
        admitted = self._admit(budget, reserved=need)
        plan.extend(admitted)
        if not plan:
            return None
        return self._build(plan)

    def _jump_forward(self, req: Req) -> None:
        """Append the forced tokens; the request then continues as an extend over them.
        No step uses the request now, so KV of re-tokenized positions can be released."""
        keep = self.jump_forward(req)
        if keep is not None:
            self.memory.rollback(req, keep)

    def _peek(self, req: Req) -> "MatchResult":
        """req's cached prefix for ordering the queue, computed again only when the tree
        changed since (a match per waiting request per step costs milliseconds)."""
        version = self.memory.cache.version
        if version != self._peek_version:
            self._peek_cache.clear()
            self._peek_version = version
        key = (id(req), len(req.output_ids))
        hit = self._peek_cache.get(key)
        if hit is None or hit[0] is not req:
            hit = self._peek_cache[key] = (req, self.memory.match(req, len(req.fill_ids) - 1,
                                                                  peek=True))
        return hit[1]

    def _retract_until_fits(self, plan: list[tuple[Req, int]]) -> list[tuple[Req, int]]:
        """Drop the latest-arrived request of the plan until the rest fits."""
        while plan and not self.memory.reserve(sum(n for _, n in plan)):
            victim = max((r for r, _ in plan), key=lambda r: r.arrival_time)
            plan = [(r, n) for r, n in plan if r is not victim]
            self._retract(victim)
        return plan

    def _retract(self, req: Req) -> None:
        assert req.num_inflight == 0, "retraction needs the real tokens: drain first"
        self.running.remove(req)
        self.memory.release(req)  # keeps its KV as a cached prefix for the resume
        req.num_computed = 0
        req.state = ReqState.WAITING
        req.num_retractions += 1
        self.stats.num_retractions += 1
        self.waiting.insert(0, req)
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)
        logger.debug("retracted %s at %d tokens", req.rid, req.seq_len)

    def _admit(self, budget: int, reserved: int) -> list[tuple[Req, int]]:
        admitted: list[tuple[Req, int]] = []
        mem = self.memory
        if (not self.waiting or budget <= 0 or len(self.running) >= self.max_running
                or mem.rows_available() == 0):
            return admitted  # nothing can be admitted: no need to order the queue
        self.waiting = order_waiting(self.waiting, self.policy, self._peek, self._rng)
        prefill_tokens = 0
        # room the running requests are expected to grow into
        headroom = sum(min(r.max_new_tokens - len(r.output_ids), self.context_len - r.seq_len)
                       for r in self.running if not r.finished) * self.new_token_ratio
        for req in list(self.waiting):
            if budget <= 0 or prefill_tokens >= self.max_prefill_tokens:
                break
            if len(self.running) >= self.max_running or mem.rows_available() == 0:
                break
            key = req.key_ids
            max_match = len(key) - 1  # at least one token must be computed to sample
            if req.logprob_start_len >= 0:
                # the row before the first scored token must be computed, not cached
                max_match = min(max_match, max(req.logprob_start_len - 1, 0))
            match = mem.match(req, max_match)
            if _shares_uncached_prefix(key, match.length, admitted):
                continue  # a request admitted this step computes it: hit the cache next step
            extend = min(len(key) - match.length, budget)
            growth = min(req.max_new_tokens - len(req.output_ids), self.context_len - len(key))
            want = extend + reserved + headroom + growth * self.new_token_ratio
            if mem.reclaimable() < want and self.running:
                break  # would likely force a retraction soon: wait for memory instead
            if not mem.admit(req, match, extend + reserved):
                break
            self.running_set.admit(req)
            if req.num_retractions == 0:
                req.first_scheduled_time = time.monotonic()
                req.num_cached = match.length
                self.stats.prompt_tokens += len(req.prompt_ids)
                self.stats.cached_tokens += match.length
            req.state = ReqState.RUNNING
            self.waiting.remove(req)
            self.running.append(req)
            admitted.append((req, extend))
            budget -= extend
            prefill_tokens += extend
            reserved += extend
            headroom += growth * self.new_token_ratio
        return admitted

    # ------------------------------------------------------------------ build
    def _build(self, plan: list[tuple[Req, int]]) -> ScheduledBatch:
        reqs = [r for r, _ in plan]
        ns = np.fromiter((n for _, n in plan), np.int64, len(plan))
        starts = np.fromiter((r.num_computed for r in reqs), np.int64, len(plan))
        total = int(ns.sum())
        # Every new token's table row and position, then one scatter into the table
        # (before the loop below: publishing a prompt prefix reads its row).
        rows = np.fromiter((r.req_pool_idx for r in reqs), np.int64, len(plan))
        if total == len(plan):  # one token each (decode batches)
            token_rows, positions = rows, starts
        else:
            token_rows = np.repeat(rows, ns)
            positions = np.arange(total, dtype=np.int64) + np.repeat(starts - (np.cumsum(ns) - ns), ns)
        slots = self.memory.extend(token_rows, positions)
        input_ids: list[int] = []
        logits_rows: list[int] = []
        sample_rows: list[int] = []
        sampling_reqs: list[Req] = []
        sample_steps: list[int] = []  # the output index each sampling request samples
        lp_rows: list[int] = []
        lp_targets: list[int] = []
        lp_spans: list[tuple[Req, int, int, int]] = []
        lp_topk = 0
        offset = 0
        num_decodes = 0
        placeholders = False
        mm_chunks: list = []  # image rows this step computes (contracts/multimodal.py)
        rope_positions = None  # positions shifted by M-RoPE images (a copy: see below)
        for req, n in plan:
            start = req.num_computed
            p = len(req.prompt_ids)
            if n == 1 and start >= p:  # a decode: its newest token, maybe still in flight
                num_decodes += 1
                out = req.output_ids
                if start - p < len(out):
                    input_ids.append(out[start - p])
                else:  # the last token is in flight: a placeholder for it
                    input_ids.append(-1 - req.extra_sample_row)
                    placeholders = True
            else:
                ids = _known_ids(req, start, n)
                if len(ids) < n:
                    ids = ids + [-1 - req.extra_sample_row]
                    placeholders = True
                input_ids.extend(ids)
                if req.mm is not None and start < p:
                    mm_chunks.extend(req.mm.chunks(start, n, offset))
            if req.mm is not None and req.mm.shift_after:
                # M-RoPE: rotary positions differ from sequence positions after an image.
                # A copy: `positions` was handed to memory.extend (table writes) above.
                if rope_positions is None:
                    rope_positions = np.array(positions, dtype=np.int64)
                rope_positions[offset:offset + n] = req.mm.positions(start, n) \
                    if start < p else np.arange(start, start + n) + req.mm.final_shift
            # prompt logprobs: row at position p scores prompt token p + 1
            if req.logprob_start_len >= 0:
                lo = max(start, max(req.logprob_start_len, 1, req.prompt_lp_next) - 1)
                hi = min(start + n, p - 1)
                if hi > lo:
                    lp_spans.append((req, lo + 1, hi - lo, len(lp_rows)))
                    req.prompt_lp_next = hi + 1
                    for pos in range(lo, hi):
                        lp_rows.append(len(logits_rows))
                        logits_rows.append(offset + pos - start)
                        lp_targets.append(req.prompt_ids[pos + 1])
                    lp_topk = max(lp_topk, req.top_logprobs_num)
            req.num_computed = start + n
            req.inflight_steps += 1
            if start < p:
                # Publish the prompt prefix now, so requests admitted from the next step on
                # reuse it even while this step is in flight: every later step runs after
                # this one has written the KV, and the request's lock keeps it from eviction.
                self.memory.publish(req)
            if start + n == p + len(req.output_ids) + req.num_inflight:
                sample_rows.append(len(logits_rows))
                logits_rows.append(offset + n - 1)
                sampling_reqs.append(req)
                sample_steps.append(start + n - p)
            offset += n
        for k, req in enumerate(sampling_reqs):
            req.extra_sample_row = k
            req.num_inflight += 1
        decode_only = num_decodes == len(plan)
        mode = (ForwardMode.DECODE if decode_only else
                ForwardMode.MIXED if num_decodes else ForwardMode.EXTEND)
        forward = ForwardBatch.build(
            mode=mode, input_ids=input_ids,
            positions=positions if rope_positions is None else rope_positions, out_cache_loc=slots,
            req_pool_indices=rows, prefix_lens=starts, extend_lens=ns,
            logits_rows=logits_rows, sample_rows=sample_rows, device=torch.device("cpu"))
        forward.extra["placeholders"] = placeholders
        if mm_chunks:
            forward.extra["mm"] = mm_chunks
        if lp_rows:
            forward.prompt_lp_rows = torch.tensor(lp_rows, dtype=torch.int64)
            forward.prompt_lp_targets = torch.tensor(lp_targets, dtype=torch.int64)
            forward.prompt_lp_topk = lp_topk
        self.stats.num_steps += 1
        self.stats.num_forward_tokens += total
        if decode_only:
            self.new_token_ratio = max(self._min_ratio, self.new_token_ratio - self._ratio_decay)
        table_rows = np.fromiter((r.req_pool_idx for r in sampling_reqs), np.int64,
                                 len(sampling_reqs))
        return ScheduledBatch(reqs=reqs, sampling_reqs=sampling_reqs,
                              sample_table_rows=table_rows,
                              sample_steps=np.array(sample_steps, dtype=np.int64),
                              prompt_lp_spans=lp_spans, forward=forward,
                              decode_only=decode_only)

    # ------------------------------------------------------------------ results
    def finish_step(self, batch: ScheduledBatch) -> list[Req]:
        """Bookkeeping after the step's results were applied to its requests.

        Releases requests that finished (their memory goes to the cache or the free list)
        and returns them.
        """
        released = []
        self.stats.generated_tokens += len(batch.sampling_reqs)
        for req in batch.reqs:
            req.inflight_steps -= 1
            if req.finished and req.inflight_steps == 0 and req.state == ReqState.RUNNING:
                self.running.remove(req)
                self._release(req)
                released.append(req)
        if self.check:
            self.check_integrity()
        return released

    def _release(self, req: Req) -> None:
        self.memory.release(req)  # only tokens whose KV was computed go into the cache
        req.state = ReqState.FINISHED

    # ------------------------------------------------------------------ checks
    def check_integrity(self) -> None:
        self.memory.check(self.running)
        self.running_set.check(self.running)

    def is_idle_and_clean(self) -> bool:
        """True when nothing runs or waits and every slot is free or cached (for tests)."""
        return not self.running and not self.waiting and self.memory.is_empty()
