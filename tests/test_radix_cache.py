"""Radix cache: exact slot ids, lock counts and eviction order on the CPU, plus a random
state machine that checks the ownership invariant after every operation.

TokenSlotAllocator(capacity) hands out slots from the end of its free list: with
capacity 16 the first alloc(4) is [13, 14, 15, 16], the next alloc(2) is [11, 12].
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from asgl.engine.scheduler.slots import ReqToTokenPool, TokenSlotAllocator
from asgl.engine.scheduler.radix_cache import RadixCache
from asgl.engine.scheduler.req import Req
from asgl.engine.contracts.sampling_params import SamplingParams


def make(cap: int = 16, rows: int = 4, ctx: int = 32, disable: bool = False):
    pool, alloc = ReqToTokenPool(rows, ctx, "cpu"), TokenSlotAllocator(cap)
    return RadixCache(pool, alloc, disable=disable), pool, alloc


def ids(t: torch.Tensor) -> list[int]:
    return t.tolist()


def mkreq(rid: str, prompt, out=(), ns=None) -> Req:
    req = Req(rid=rid, prompt_ids=list(prompt), sampling=SamplingParams(), seed=0,
              output_ids=list(out))
    if ns is not None:
        req.cache_namespace = ns
    return req


def admit(cache: RadixCache, req: Req, computed: int | None = None) -> bool:
    """What the scheduler does: match (leaving one token to compute), lock, allocate the
    rest (evicting if short), fill the row. Computes `computed` tokens (default: all)."""
    pool, alloc = cache.req_to_token_pool, cache.allocator
    fill, ns = req.fill_ids, getattr(req, "cache_namespace", None)
    m = cache.match_prefix(fill, ns, max_len=len(fill) - 1)
    cache.inc_lock(m.node)
    need = max(len(fill) if computed is None else computed, m.length) - m.length
    if alloc.available() < need:
        cache.evict(need - alloc.available())
    row, slots = pool.alloc(), alloc.alloc(need)
    if row is None or slots is None:
        if row is not None:
            pool.free(row)
        if slots is not None:
            alloc.free(slots)
        cache.dec_lock(m.node)
        return False
    pool.write(row, 0, m.slots)
    pool.write(row, m.length, slots)
    req.req_pool_idx, req.cache_node = row, m.node
    req.num_computed = m.length + need
    return True


def row_of(cache: RadixCache, req: Req) -> list[int]:
    return ids(cache.req_to_token_pool.req_to_token[req.req_pool_idx, :req.num_computed])


# ---------------------------------------------------------------------- tree basics
def test_insert_and_match_exact():
    cache, _, alloc = make()
    s = alloc.alloc(4)
    assert ids(s) == [13, 14, 15, 16]
    assert cache.insert([1, 2, 3, 4], s) == 0
    m = cache.match_prefix([1, 2, 3, 4, 5])
    assert (m.length, ids(m.slots), m.node.key) == (4, [13, 14, 15, 16], (1, 2, 3, 4))
    miss = cache.match_prefix([9, 1])
    assert miss.length == 0 and miss.node.is_root and ids(miss.slots) == []
    assert (cache.evictable_size(), cache.protected_size(), cache.total_size()) == (4, 0, 4)
    # the same tokens again: all 4 were there, the caller's slots are duplicates
    dup = alloc.alloc(4)
    assert cache.insert([1, 2, 3, 4], dup) == 4
    alloc.free(dup)
    assert cache.total_size() == 4
    cache.check_integrity([])


def test_split_on_partial_match():
    cache, _, alloc = make()
    cache.insert([1, 2, 3, 4, 5], alloc.alloc(5))  # slots 12..16
    m = cache.match_prefix([1, 2, 3, 9])
    assert (m.length, ids(m.slots)) == (3, [12, 13, 14])
    upper = m.node
    assert upper.key == (1, 2, 3) and ids(upper.value) == [12, 13, 14] and upper.depth == 3
    assert upper.parent.is_root and list(upper.children) == [4]
    lower = upper.children[4]
    assert lower.key == (4, 5) and ids(lower.value) == [15, 16] and lower.depth == 5
    assert lower.parent is upper and not lower.children
    # an insert diverging inside (1, 2, 3) splits it again, after 2 tokens
    s = alloc.alloc(4)
    assert ids(s) == [8, 9, 10, 11]
    assert cache.insert([1, 2, 7, 8], s) == 2
    alloc.free(s[:2])
    top = cache.match_prefix([1, 2]).node
    assert top.key == (1, 2) and ids(top.value) == [12, 13] and sorted(top.children) == [3, 7]
    assert top.children[3] is upper and upper.key == (3,) and ids(upper.value) == [14]
    assert top.children[7].key == (7, 8) and ids(top.children[7].value) == [10, 11]
    assert ids(cache.match_prefix([1, 2, 3, 4, 5]).slots) == [12, 13, 14, 15, 16]
    cache.check_integrity([])


def test_split_keeps_lock_counts():
    cache, _, alloc = make()
    cache.insert([1, 2, 3, 4], alloc.alloc(4))
    node = cache.match_prefix([1, 2, 3, 4]).node
    cache.inc_lock(node)
    upper = cache.match_prefix([1, 2]).node  # splits the locked node
    assert upper.lock_ref == 1 and node.lock_ref == 1 and node.parent is upper
    assert (cache.evictable_size(), cache.protected_size()) == (0, 4)
    cache.check_integrity([], extra_locked=[node])
    cache.dec_lock(node)
    assert upper.lock_ref == 0 and cache.evictable_size() == 4
    cache.check_integrity([])


def test_lock_ref_counts_and_underflow():
    cache, _, alloc = make()
    cache.insert([1, 2], alloc.alloc(2))
    s = alloc.alloc(3)
    assert cache.insert([1, 2, 3], s) == 2  # adds leaf (3,) under (1, 2)
    alloc.free(s[:2])  # the duplicates
    leaf = cache.match_prefix([1, 2, 3]).node
    top = leaf.parent
    cache.inc_lock(leaf)
    cache.inc_lock(leaf)
    cache.inc_lock(top)
    assert (top.lock_ref, leaf.lock_ref) == (3, 2)
    cache.dec_lock(leaf)
    cache.dec_lock(leaf)
    cache.dec_lock(top)
    assert (top.lock_ref, leaf.lock_ref) == (0, 0)
    with pytest.raises(AssertionError, match="below zero"):
        cache.dec_lock(leaf)


def test_namespace_isolation():
    cache, _, alloc = make()
    assert cache.insert([1, 2, 3], alloc.alloc(3)) == 0  # 14..16
    assert cache.insert([1, 2, 3], alloc.alloc(3), namespace="lora-a") == 0  # 11..13
    assert ids(cache.match_prefix([1, 2, 3]).slots) == [14, 15, 16]
    assert ids(cache.match_prefix([1, 2, 3], "lora-a").slots) == [11, 12, 13]
    assert cache.match_prefix([1, 2, 3], "lora-b").length == 0
    assert cache.total_size() == 6
    cache.check_integrity([])
    assert cache.evict(100) == 6
    assert alloc.available() == 16 and set(cache._roots) == {None}
    cache.check_integrity([])


# ---------------------------------------------------------------------- eviction
def _freed(alloc: TokenSlotAllocator, before: set[int]) -> list[int]:
    return sorted(alloc.free_slot_set() - before)


def test_eviction_order_is_lru():
    cache, _, alloc = make()
    cache.insert([1, 1], alloc.alloc(2))  # A: 15, 16
    cache.insert([2, 2], alloc.alloc(2))  # B: 13, 14
    cache.insert([3, 3], alloc.alloc(2))  # C: 11, 12
    cache.match_prefix([1, 1])  # A becomes the most recent
    order = []
    for _ in range(3):
        before = alloc.free_slot_set()
        assert cache.evict(1) == 2
        order.append(_freed(alloc, before))
        cache.check_integrity([])
    assert order == [[13, 14], [11, 12], [15, 16]]
    assert cache.evict(1) == 0 and cache.total_size() == 0


def test_eviction_parent_becomes_leaf():
    cache, _, alloc = make()
    cache.insert([1, 2, 3], alloc.alloc(3))  # 14, 15, 16
    s = alloc.alloc(3)  # 11, 12, 13
    assert cache.insert([1, 2, 4], s) == 2  # leaf (4,) owns 13
    alloc.free(s[:2])
    cache.match_prefix([1, 2, 3])
    order = []
    while cache.total_size():
        before = alloc.free_slot_set()
        cache.evict(1)
        order.append(_freed(alloc, before))
    assert order == [[13], [16], [14, 15]]  # leaf (4,), leaf (3,), then (1, 2)


def test_evict_partial_amounts():
    cache, _, alloc = make()
    for t in range(1, 5):
        cache.insert([t, t], alloc.alloc(2))
    assert cache.evict(3) == 4  # two whole leaves
    assert cache.evictable_size() == 4
    assert cache.evict(0) == 0
    assert cache.evict(100) == 4  # only what there is
    assert alloc.available() == 16
    cache.check_integrity([])


def test_locked_nodes_never_evicted():
    cache, _, alloc = make()
    cache.insert([1, 2, 3], alloc.alloc(3))  # 14..16
    s = alloc.alloc(3)
    cache.insert([1, 2, 4], s)  # leaf (4,) = 13
    alloc.free(s[:2])
    cache.insert([5, 5], alloc.alloc(2))  # 9, 10
    locked = cache.match_prefix([1, 2, 3]).node
    cache.inc_lock(locked)
    assert (cache.protected_size(), cache.evictable_size()) == (3, 3)
    assert cache.evict(100) == 3  # leaf (4,) and (5, 5); never (1, 2) or (3,)
    assert cache.match_prefix([1, 2, 3]).length == 3
    assert cache.evict(100) == 0
    cache.check_integrity([], extra_locked=[locked])
    cache.dec_lock(locked)
    assert cache.evict(100) == 3 and alloc.available() == 16


# ---------------------------------------------------------------------- prefix caps
def test_max_len_caps_match():
    cache, _, alloc = make()
    cache.insert([1, 2, 3, 4], alloc.alloc(4))
    m = cache.match_prefix([1, 2, 3, 4], max_len=3)  # len(prompt) - 1
    assert (m.length, ids(m.slots), m.node.key) == (3, [13, 14, 15], (1, 2, 3))
    assert cache.match_prefix([1, 2, 3, 4], max_len=1).length == 1  # logprob_start_len
    m0 = cache.match_prefix([1, 2, 3, 4], max_len=0)
    assert m0.length == 0 and m0.node.is_root
    cache.check_integrity([])


def test_peek_does_not_modify():
    cache, _, alloc = make()
    cache.insert([1, 2, 3, 4], alloc.alloc(4))
    node = cache.match_prefix([1, 2, 3, 4]).node
    t = node.last_access
    m = cache.match_prefix([1, 2, 9], peek=True)
    assert (m.length, ids(m.slots)) == (2, [13, 14]) and m.node.is_root
    assert node.key == (1, 2, 3, 4) and node.last_access == t  # no split, no touch


# ---------------------------------------------------------------------- request helpers
def test_cache_finished_req():
    cache, pool, alloc = make()
    req = mkreq("a", [1, 2, 3, 4], out=[5])
    assert admit(cache, req, computed=4)  # the sampled 5 has no KV yet
    assert row_of(cache, req) == [13, 14, 15, 16] and req.cache_node.is_root
    cache.check_integrity([req])
    cache.cache_finished_req(req)
    assert req.req_pool_idx is None and req.cache_node is None and pool.available() == 4
    m = cache.match_prefix([1, 2, 3, 4, 5])
    assert (m.length, ids(m.slots)) == (4, [13, 14, 15, 16])
    assert cache.evictable_size() == 4 and alloc.available() == 12
    cache.check_integrity([])


def test_cache_finished_req_frees_duplicates_and_uncomputed_tail():
    cache, _, alloc = make()
    a, b = mkreq("a", [1, 2, 3, 4]), mkreq("b", [1, 2, 3, 4, 7])
    assert admit(cache, a) and admit(cache, b)  # both miss: a 13..16, b 8..12
    assert row_of(cache, b) == [8, 9, 10, 11, 12]
    cache.check_integrity([a, b])
    cache.cache_finished_req(a)
    cache.check_integrity([b])
    cache.cache_finished_req(b)
    assert alloc.free_slot_set() == set(range(1, 12))  # b's 8..11 were duplicates
    assert ids(cache.match_prefix([1, 2, 3, 4, 7]).slots) == [13, 14, 15, 16, 12]
    cache.check_integrity([])
    # overlap: a position computed whose input token never arrived (num_computed > fill)
    c = mkreq("c", [9, 9])
    assert admit(cache, c)  # 10, 11
    extra = alloc.alloc(1)  # 9: the in-flight position 2
    cache.req_to_token_pool.write(c.req_pool_idx, 2, extra)
    c.num_computed = 3
    cache.check_integrity([c])
    cache.cache_finished_req(c)
    assert 9 in alloc.free_slot_set() and ids(cache.match_prefix([9, 9]).slots) == [10, 11]
    cache.check_integrity([])


def test_cache_unfinished_req_shares_inflight_prefix():
    cache, _, alloc = make()
    a = mkreq("a", [1, 2, 3, 4, 5, 6])
    assert admit(cache, a)  # 11..16
    cache.cache_unfinished_req(a)
    node = a.cache_node
    assert node.key == (1, 2, 3, 4, 5, 6) and node.lock_ref == 1
    assert (cache.protected_size(), cache.evictable_size()) == (6, 0)
    assert row_of(cache, a) == [11, 12, 13, 14, 15, 16]
    cache.check_integrity([a])
    fork = mkreq("fork", [1, 2, 3, 4, 5, 6, 9, 9])
    assert admit(cache, fork)
    assert fork.cache_node is node and node.lock_ref == 2
    assert row_of(cache, fork) == [11, 12, 13, 14, 15, 16, 9, 10]
    cache.check_integrity([a, fork])
    # a decodes one token, then finishes
    a.output_ids = [42, 43]
    s = alloc.alloc(1)
    cache.req_to_token_pool.write(a.req_pool_idx, 6, s)
    a.num_computed = 7
    cache.check_integrity([a, fork])
    cache.cache_finished_req(a)
    assert node.lock_ref == 1 and ids(node.children[42].value) == ids(s) == [8]
    cache.check_integrity([fork])
    cache.cache_finished_req(fork)
    assert cache.protected_size() == 0 and cache.total_size() == 9
    cache.check_integrity([])


def test_cache_unfinished_req_repoints_duplicates():
    cache, _, alloc = make()
    a, b = mkreq("a", [1, 2, 3, 4]), mkreq("b", [1, 2, 3, 4, 5])
    assert admit(cache, a) and admit(cache, b)  # a 13..16, b 8..12
    cache.cache_unfinished_req(a)
    cache.cache_unfinished_req(b)
    assert row_of(cache, b) == [13, 14, 15, 16, 12]
    assert alloc.free_slot_set() == set(range(1, 12))
    top = a.cache_node
    assert b.cache_node.parent is top and b.cache_node.key == (5,)
    assert (top.lock_ref, b.cache_node.lock_ref) == (2, 1)
    cache.check_integrity([a, b])
    for r in (b, a):
        cache.cache_finished_req(r)
        cache.check_integrity([a] if r is b else [])
    assert cache.total_size() == 5 and cache.protected_size() == 0


def test_release_req_rollback():
    cache, _, alloc = make()
    first = mkreq("first", [1, 2, 3, 4])
    assert admit(cache, first)
    cache.cache_finished_req(first)  # tree (1, 2, 3, 4) = 13..16
    req = mkreq("r", [1, 2, 3, 4, 5, 6, 7])
    assert admit(cache, req)  # hit 4, private 10, 11, 12
    assert row_of(cache, req) == [13, 14, 15, 16, 10, 11, 12]
    cache.release_req(req, 5)  # jump-forward: drop positions 5, 6
    assert req.num_computed == 5 and {11, 12} <= alloc.free_slot_set()
    assert req.cache_node.key == (1, 2, 3, 4)
    cache.check_integrity([req])
    cache.release_req(req, 2)  # into the locked path: lock moves up, 10 freed
    assert req.num_computed == 2 and req.cache_node.key == (1, 2)
    assert req.cache_node.lock_ref == 1 and req.cache_node.children[3].lock_ref == 0
    assert 10 in alloc.free_slot_set()
    cache.check_integrity([req])
    before = alloc.free_slot_set()
    assert cache.evict(100) == 2 and _freed(alloc, before) == [15, 16]
    cache.release_req(req, 0)
    assert req.cache_node is None and cache.protected_size() == 0
    cache.check_integrity([req])
    cache.cache_finished_req(req)
    assert cache.evict(100) == 2 and alloc.available() == 16


# ---------------------------------------------------------------------- flush, disabled
def test_reset_refused_while_locked():
    cache, _, alloc = make()
    req = mkreq("a", [1, 2, 3])
    assert admit(cache, req)
    cache.cache_unfinished_req(req)
    assert cache.reset() is False and cache.total_size() == 3
    cache.cache_finished_req(req)
    assert cache.reset() is True
    assert cache.total_size() == 0 and alloc.available() == 16
    assert cache.match_prefix([1, 2, 3]).length == 0
    cache.check_integrity([])


def test_disabled_mode():
    cache, pool, alloc = make(disable=True)
    a = mkreq("a", [1, 2, 3, 4], out=[5])
    assert admit(cache, a)
    cache.cache_unfinished_req(a)  # no-op
    assert cache.total_size() == 0 and a.cache_node.is_root
    cache.check_integrity([a])
    cache.cache_finished_req(a)
    assert alloc.available() == 16 and pool.available() == 4 and a.req_pool_idx is None
    b = mkreq("b", [1, 2, 3, 4, 5])
    assert admit(cache, b) and b.num_computed == 5 and row_of(cache, b) == [7, 8, 9, 10, 11]
    s = alloc.alloc(2)
    assert cache.insert([7, 7], s) == 0 and alloc.available() == 11  # insert frees them
    assert cache.evict(10) == 0 and cache.reset()
    cache.release_req(b, 2)
    assert alloc.available() == 14
    cache.check_integrity([b])
    cache.cache_finished_req(b)
    assert alloc.available() == 16
    cache.check_integrity([])


def test_integrity_check_catches_leaks_and_double_ownership():
    cache, _, alloc = make()
    cache.insert([1, 2], alloc.alloc(2))
    leaked = alloc.alloc(1)
    with pytest.raises(AssertionError, match="leaked"):
        cache.check_integrity([])
    alloc.free(leaked)
    alloc.free(cache.match_prefix([1, 2]).slots[:1])  # freed while the tree owns it
    with pytest.raises(AssertionError, match="owned by both"):
        cache.check_integrity([])


def test_pretty_print(capsys):
    cache, _, alloc = make()
    cache.insert([1, 2, 3], alloc.alloc(3))
    text = cache.pretty_print()
    assert "root[None]" in text and "len=3" in text and text in capsys.readouterr().out


# ---------------------------------------------------------------------- random sequences
CAP, ROWS, CTX = 28, 5, 24
tokens = st.integers(1, 3)  # a tiny vocabulary: lots of shared prefixes and splits


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cache, self.pool, self.alloc = make(CAP, ROWS, CTX)
        self.running: list[Req] = []
        self.waiting: list[Req] = []
        self.extra_locks = []
        self.n = 0

    def _pick(self, data, reqs):
        return reqs[data.draw(st.integers(0, len(reqs) - 1))]

    @rule(data=st.data(), prompt=st.lists(tokens, min_size=1, max_size=10),
          ns=st.sampled_from([None, None, "lora"]), fork=st.booleans())
    def new_request(self, data, prompt, ns, fork):
        if fork and self.running:  # share a running request's in-flight prefix
            parent = self._pick(data, self.running)
            ns = getattr(parent, "cache_namespace", None)
            prompt = parent.fill_ids[:data.draw(st.integers(1, len(parent.fill_ids)))] + prompt
        self.n += 1
        self.waiting.append(mkreq(f"r{self.n}", prompt[:CTX - 4], ns=ns))
        self._admit(data, self.waiting[-1])  # retracted requests wait; new ones go now

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def admit_waiting(self, data):
        self._admit(data, self._pick(data, self.waiting))

    def _admit(self, data, req):
        m = self.cache.match_prefix(req.fill_ids, getattr(req, "cache_namespace", None),
                                    max_len=len(req.fill_ids) - 1, peek=True)
        chunk = data.draw(st.integers(1, len(req.fill_ids) - m.length))
        if admit(self.cache, req, computed=m.length + chunk):
            self.waiting.remove(req)
            self.running.append(req)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), n=st.integers(1, 4))
    def compute(self, data, n):  # a prefill chunk or decode step (maybe a placeholder)
        req = self._pick(data, self.running)
        n = min(n, len(req.fill_ids) + 1 - req.num_computed, CTX - req.num_computed)
        if n <= 0:
            return
        if self.alloc.available() < n:
            self.cache.evict(n - self.alloc.available())
        slots = self.alloc.alloc(n)
        if slots is not None:
            self.pool.write(req.req_pool_idx, req.num_computed, slots)
            req.num_computed += n

    @precondition(lambda self: self.running)
    @rule(data=st.data(), tok=tokens)
    def sample(self, data, tok):
        req = self._pick(data, self.running)
        if len(req.fill_ids) <= req.num_computed and len(req.fill_ids) < CTX:
            req.output_ids.append(tok)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def cache_unfinished(self, data):
        self.cache.cache_unfinished_req(self._pick(data, self.running))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data):
        req = self._pick(data, self.running)
        self.cache.cache_finished_req(req)
        self.running.remove(req)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def retract(self, data):  # what the scheduler does: cache it, resume it later
        req = self._pick(data, self.running)
        self.cache.cache_finished_req(req)
        req.num_computed = 0
        self.running.remove(req)
        self.waiting.append(req)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), tok=tokens)
    def rollback(self, data, tok):  # jump-forward / partial retraction
        req = self._pick(data, self.running)
        keep = data.draw(st.integers(0, req.num_computed))
        self.cache.release_req(req, keep)
        assert req.num_computed == keep
        if keep >= len(req.prompt_ids) and keep < CTX:  # rewrite the rolled-back tokens
            req.output_ids = req.output_ids[:keep - len(req.prompt_ids)] + [tok]

    @rule(n=st.integers(0, CAP))
    def evict(self, n):
        evictable = self.cache.evictable_size()
        freed = self.cache.evict(n)
        assert freed >= min(n, evictable) and freed <= evictable
        assert self.cache.evictable_size() == evictable - freed

    @rule(key=st.lists(tokens, max_size=12), ns=st.sampled_from([None, "lora", "x"]),
          max_len=st.none() | st.integers(0, 12), peek=st.booleans())
    def probe(self, key, ns, max_len, peek):
        m = self.cache.match_prefix(key, ns, max_len=max_len, peek=peek)
        assert m.slots.numel() == m.length <= len(key)
        if not peek:
            assert m.node.depth == m.length

    @rule(key=st.lists(tokens, min_size=1, max_size=8))
    def lock_external(self, key):
        m = self.cache.match_prefix(key)
        self.cache.inc_lock(m.node)
        self.extra_locks.append(m.node)

    @precondition(lambda self: self.extra_locks)
    @rule()
    def unlock_external(self):
        self.cache.dec_lock(self.extra_locks.pop(0))

    @rule(go=st.integers(0, 7))
    def flush(self, go):
        if go:  # rarely: a flush empties the tree and with it the interesting states
            return
        locked = self.cache.protected_size() > 0
        assert self.cache.reset() is (not locked)

    @invariant()
    def integrity(self):
        self.cache.check_integrity(self.running, self.extra_locks)

    def teardown(self):
        for req in self.running:
            self.cache.cache_finished_req(req)
        for node in self.extra_locks:
            self.cache.dec_lock(node)
        self.cache.check_integrity([])
        assert self.cache.reset()
        assert self.alloc.available() == CAP and self.pool.available() == ROWS


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50,
                                          deadline=None, report_multiple_bugs=False)
TestCacheMachine = CacheMachine.TestCase
