"""Cache-aware routing of requests over data-parallel engine replicas.

The front keeps, per replica, an approximate picture of its radix cache: the prompts it
sent there, as chained hashes of `block`-token blocks (hash i covers tokens
[0, (i + 1) * block), so one lookup per block finds the longest cached prefix) in an LRU set
sized like the replica's KV pool. It learns nothing from the replicas, so it errs where
their cache evicted on its own schedule; the hit rates they report show how well it works.

Policy: among the replicas whose load (sequences sent and not finished) is within a slack
of the least loaded one, take the one holding the longest prefix of the prompt; with no
prefix anywhere, the least loaded (round-robin among equals). The slack,
max(abs_slack, rel_slack * least load), decides how much queueing a cache hit is worth.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

DEFAULT_BLOCK = 16


def block_hashes(ids: Sequence[int], block: int = DEFAULT_BLOCK) -> list[int]:
    """Chained hashes of the whole blocks of `ids` (a partial last block is left out)."""
    out, prev = [], 0
    for start in range(0, len(ids) - block + 1, block):
        prev = hash((prev, tuple(ids[start:start + block])))
        out.append(prev)
    return out


class ReplicaCacheView:
    """What one replica's prefix cache probably holds, as an LRU set of block hashes."""

    def __init__(self, capacity_tokens: int, block: int = DEFAULT_BLOCK):
        self.max_blocks = max(1, capacity_tokens // block)
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are held."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            if h in self.blocks:
                self.blocks.move_to_end(h)
            else:
                self.blocks[h] = None
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)

    def clear(self) -> None:
        self.blocks.clear()


@dataclass
class RouteStats:
    requests: int = 0
    by_prefix: int = 0  # routed to a replica because it held a prefix
    predicted_tokens: int = 0  # prefix tokens the view expected the replica to hold


class CacheAwareRouter:
    def __init__(self, capacities: Sequence[int], block: int = DEFAULT_BLOCK,
                 abs_slack: int = 8, rel_slack: float = 0.5):
        self.block = block
        self.views = [ReplicaCacheView(c, block) for c in capacities]
        self.load = [0] * len(capacities)
        self.alive = [True] * len(capacities)
        self.stats = [RouteStats() for _ in capacities]
        self.abs_slack, self.rel_slack = abs_slack, rel_slack
        self._next = 0  # round-robin start among equally good replicas

    def route(self, ids: Sequence[int], weight: int = 1) -> tuple[int, int]:
        """Pick a replica for a prompt of `ids` that runs `weight` sequences; returns
        (replica, prefix tokens it probably holds) and counts the load."""
        live = [i for i, ok in enumerate(self.alive) if ok]
        if not live:
            raise RuntimeError("no data-parallel replica is alive")
        hashes = block_hashes(ids, self.block)
        least = min(self.load[i] for i in live)
        slack = max(self.abs_slack, int(self.rel_slack * least))
        eligible = [i for i in live if self.load[i] <= least + slack]
        matches = {i: self.views[i].match(hashes) for i in eligible}
        n = len(self.load)
        # order: longest prefix, then lower load, then round-robin position
        best = max(eligible, key=lambda i: (matches[i], -self.load[i], -((i - self._next) % n)))
        if matches[best] == 0:
            best = min((i for i in live if self.load[i] == least),
                       key=lambda i: (i - self._next) % n)
            self._next = (best + 1) % n
        self.views[best].insert(hashes)
        self.load[best] += weight
        stats = self.stats[best]
        stats.requests += 1
        predicted = matches.get(best, 0) * self.block
        if predicted:
            stats.by_prefix += 1
            stats.predicted_tokens += predicted
        return best, predicted

    def finish(self, replica: int, weight: int = 1) -> None:
        self.load[replica] = max(0, self.load[replica] - weight)

    def mark_dead(self, replica: int) -> None:
        self.alive[replica] = False
        self.views[replica].clear()

    def clear(self) -> None:
        for view in self.views:
            view.clear()
