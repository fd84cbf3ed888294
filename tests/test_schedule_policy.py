"""Scheduling policies over the radix cache: dfs-weight groups requests by their cached
prefixes, heaviest subtree first; lpm orders by cached length."""

from __future__ import annotations

import random

import torch

from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.engine.scheduler.memory import KVMemory
from asgl.engine.scheduler.policy import dfs_weight_order, order_waiting
from asgl.engine.scheduler.radix_cache import RadixCache
from asgl.engine.scheduler.req import Req


def _req(rid: str, prompt: list[int]) -> Req:
    return Req(rid=rid, prompt_ids=prompt, sampling=SamplingParams(), seed=0)


def _memory() -> KVMemory:
    """A tree of [1,2,3] -> {[4,5,6], [7,8]} and [9,9,9] (a split on insert)."""
    memory = KVMemory(64, 8, 64)
    for key in ([1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8], [9, 9, 9]):
        memory.cache.insert(key, memory.slots.alloc(len(key)))
    return memory


def _cache() -> RadixCache:
    return _memory().cache


# arrival order a..f; weights: [1,2,3] holds b, c, d, f; [4,5,6] holds b, d
REQS = {"a": [9, 9, 9, 1], "b": [1, 2, 3, 4, 5, 6, 0], "c": [1, 2, 3, 7, 8, 0],
        "d": [1, 2, 3, 4, 5, 6, 1], "e": [5, 5], "f": [1, 2, 3, 0]}
DFS_ORDER = ["b", "d", "c", "f", "a", "e"]


def _peek_nodes(cache, reqs):
    return [cache.match_prefix(r.fill_ids, max_len=len(r.fill_ids) - 1, peek=True).node
            for r in reqs]


def test_dfs_weight_order_exact():
    cache = _cache()
    reqs = [_req(k, v) for k, v in REQS.items()]
    order = dfs_weight_order(reqs, _peek_nodes(cache, reqs))
    assert [r.rid for r in order] == DFS_ORDER


def test_dfs_weight_order_is_a_permutation_that_keeps_groups_together():
    cache = _cache()
    gen = torch.Generator().manual_seed(0)
    prefixes = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8], [9, 9, 9], [1, 2, 3], []]
    reqs = []
    for i in range(60):
        p = prefixes[int(torch.randint(0, len(prefixes), (1,), generator=gen))]
        reqs.append(_req(str(i), p + [100 + i]))
    order = dfs_weight_order(reqs, _peek_nodes(cache, reqs))
    assert sorted(r.rid for r in order) == sorted(r.rid for r in reqs)
    # each group of requests with the same cached prefix is contiguous, in arrival order
    groups = [tuple(r.prompt_ids[:-1]) for r in order]
    seen = []
    for g in groups:
        if not seen or seen[-1] != g:
            assert g not in seen, f"group {g} split"
            seen.append(g)
    for g in set(groups):
        members = [int(r.rid) for r in order if tuple(r.prompt_ids[:-1]) == g]
        assert members == sorted(members)


def test_scheduler_applies_policies():
    for policy, expected in (("dfs-weight", DFS_ORDER),
                             ("lpm", ["b", "d", "c", "a", "f", "e"]),  # by length: a ties f
                             ("fcfs", list(REQS))):
        memory = _memory()
        waiting = [_req(k, v) for k, v in REQS.items()]
        order = order_waiting(waiting, policy,
                              lambda r: memory.match(r, len(r.fill_ids) - 1, peek=True),
                              random.Random(0))
        assert [r.rid for r in order] == expected, policy
