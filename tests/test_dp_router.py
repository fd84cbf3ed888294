"""The data-parallel routing policy on its own: prefix affinity, balance, LRU views."""

from __future__ import annotations

from asgl.engine.dp.router import CacheAwareRouter, ReplicaCacheView, block_hashes


def doc(seed: int, n: int = 64) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def test_block_hashes_chain_whole_blocks_only():
    a, b = doc(1, 40), doc(1, 40)
    b[20] += 1  # second block differs
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert len(ha) == 2  # 40 tokens: two whole blocks
    assert ha[0] == hb[0] and ha[1] != hb[1]
    assert block_hashes(a[:15], 16) == []


def test_routes_to_the_replica_holding_the_longest_prefix():
    router = CacheAwareRouter([10_000, 10_000])
    first = [router.route(doc(s) + [1, 2, 3])[0] for s in range(4)]
    assert sorted(first) == [0, 0, 1, 1]  # no prefix anywhere: spread by load/round-robin
    for s in range(4):
        replica, predicted = router.route(doc(s) + [9, 9, 9, 9])
        assert replica == first[s] and predicted == 64
    assert [st.by_prefix for st in router.stats] == [2, 2]


def test_load_beats_prefix_beyond_the_slack():
    router = CacheAwareRouter([10_000, 10_000], abs_slack=2, rel_slack=0.0)
    home, _ = router.route(doc(1))
    for _ in range(2):  # within the slack: still the prefix holder
        assert router.route(doc(1) + [5])[0] == home
    other, predicted = router.route(doc(1) + [6])  # home has 3 in flight, the other 0
    assert other != home and predicted == 0
    for _ in range(3):
        router.finish(home)
    assert router.route(doc(1) + [7])[0] == home  # load back down: affinity again


def test_dead_replica_gets_nothing_and_view_evicts_lru():
    router = CacheAwareRouter([10_000, 10_000])
    home, _ = router.route(doc(3))
    router.mark_dead(home)
    assert router.route(doc(3))[0] != home
    view = ReplicaCacheView(capacity_tokens=64, block=16)  # 4 blocks
    old, new = block_hashes(doc(1), 16), block_hashes(doc(2), 16)
    view.insert(old)
    view.insert(new)
    assert view.match(new) == 4 and view.match(old) == 0
