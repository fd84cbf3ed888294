"""KVMemory: the scheduler's one interface to KV memory.

Owner: the scheduler, on the event loop. Behind it are the request table
(`ReqToTokenPool`), the slot free list (`TokenSlotAllocator`) and the prefix cache
(`RadixCache`); the scheduler never calls those three itself, so the ordering rules they
need are kept here, and checked:

- `admit` locks the matched prefix *before* anything is evicted or allocated (an eviction
  must never free the prefix being admitted), and undoes everything when it cannot fit;
- `extend` only hands out slots that a `reserve` (or `admit`) made free;
- `release` and `rollback` need a request that no step in flight still uses
  (`req.inflight_steps == 0`): a step in flight may still write its KV;
- `publish` (a running request's computed prefix into the cache, so that requests
  admitted from the next step on share it) may run while its step is in flight: every
  later step runs after that step wrote the KV, and the request's lock keeps it cached.

Every KV slot is exactly one of: free, owned by a cache node, or private to one running
request (its tail past its locked cached prefix); `check` verifies that (tests run it
after every step with --debug-check-integrity).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import numpy as np
import torch

from asgl.engine.scheduler.radix_cache import MatchResult, RadixCache
from asgl.engine.scheduler.slots import ReqToTokenPool, TokenSlotAllocator

if TYPE_CHECKING:
    from asgl.engine.scheduler.req import Req


class KVMemory:
    def __init__(self, capacity: int, max_reqs: int, context_len: int, *,
                 track_writes: bool = False, disable_cache: bool = False):
        """`capacity` KV slots (1..capacity; slot 0 is the padding slot), `max_reqs` table
        rows of `context_len` positions. `track_writes`: queue every table write for a
        device copy of the table (`take_table_writes`)."""
        self.table = ReqToTokenPool(max_reqs, context_len, track_writes=track_writes)
        self.slots = TokenSlotAllocator(capacity)
        self.cache = RadixCache(self.table, self.slots, disable=disable_cache)
        self.capacity = capacity
        self.num_rows = max_reqs
        self._reserved = 0  # slots made free by reserve/admit and not yet taken by extend

    # ------------------------------------------------------------------ sizes
    def available(self) -> int:
        """Free slots now."""
        return self.slots.available()

    def reclaimable(self) -> int:
        """Free slots plus what evicting every unlocked cached prefix would free."""
        return self.slots.available() + self.cache.evictable_size()

    def rows_available(self) -> int:
        return self.table.available()

    def cached_tokens(self) -> int:
        return self.cache.total_size()

    @property
    def req_to_token(self) -> torch.Tensor:
        """The host request table (a CPU worker reads it directly)."""
        return self.table.req_to_token

    def take_table_writes(self) -> Optional[tuple]:
        """(rows, cols, slots) host tensors of the table writes since the last call."""
        return self.table.take_writes()

    # ------------------------------------------------------------------ admission
    def match(self, req: "Req", max_len: int, *, peek: bool = False) -> MatchResult:
        """The longest cached prefix of req's tokens, at most `max_len` long. A non-peek
        match marks the path recently used (and may split a node); nothing is locked."""
        return self.cache.match_prefix(req.key_ids, req.cache_namespace, max_len=max_len,
                                       peek=peek)

    def admit(self, req: "Req", match: MatchResult, need: int) -> bool:
        """Give `req` a table row holding `match`'s prefix, lock that prefix, and make
        `need` slots free for this step. False (and nothing changed) when they do not fit
        or no row is free."""
        if self.table.available() == 0:
            return False
        self.cache.inc_lock(match.node)  # first: evicting below must not free this prefix
        if not self.reserve(need):
            self.cache.dec_lock(match.node)
            return False
        row = self.table.alloc()
        req.req_pool_idx = row
        req.cache_node = match.node
        if match.length:
            self.table.write(row, 0, match.slots)
        req.num_computed = match.length
        return True

    def reserve(self, n: int) -> bool:
        """Make sure `n` slots are free for the next `extend`, evicting unlocked cached
        prefixes (least recently used first) if needed."""
        free = self.slots.available()
        if free < n:
            self.cache.evict(n - free)
            free = self.slots.available()
        if free < n:
            return False
        self._reserved = n  # callers reserve a step's running total, not increments
        return True

    # ------------------------------------------------------------------ a step's tokens
    def extend(self, rows: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """Slots for new tokens: position positions[i] of table row rows[i] gets slots[i]
        (one scatter into the table for the whole step). The slots must have been
        reserved."""
        n = len(positions)
        assert n <= self._reserved, f"extend of {n} slots, only {self._reserved} reserved"
        slots = self.slots.alloc(n)
        assert slots is not None, "reserved slots were taken"
        self._reserved = 0
        self.table.write_tokens(rows, positions, slots)
        return slots

    def publish(self, req: "Req") -> None:
        """Put req's computed prefix into the cache now (its lock moves to the new deepest
        node), so that requests admitted from the next step on reuse it."""
        self.cache.cache_unfinished_req(req)

    # ------------------------------------------------------------------ giving back
    def release(self, req: "Req") -> None:
        """Finish with req's memory (finished, aborted or retracted): its computed tokens
        stay cached, its private duplicates are freed, its row and lock given back."""
        assert req.inflight_steps == 0, f"{req.rid}: released while a step uses it"
        if req.req_pool_idx is not None:
            self.cache.cache_finished_req(req)
        req.cache_node = None

    def rollback(self, req: "Req", keep_tokens: int) -> None:
        """Keep only req's first `keep_tokens` computed positions (jump-forward re-tokenized
        the rest); their slots past its cached prefix are freed."""
        assert req.inflight_steps == 0, f"{req.rid}: rolled back while a step uses it"
        if keep_tokens < req.num_computed:
            self.cache.release_req(req, keep_tokens)

    def flush(self) -> bool:
        """Empty the prefix cache; refused (False) while requests hold cached prefixes."""
        return self.cache.reset()

    # ------------------------------------------------------------------ checks
    def check(self, running: Sequence["Req"]) -> None:
        """Raise AssertionError unless every slot has exactly one owner and every running
        request holding memory has its own row (O(capacity): tests and debugging)."""
        holders = [r for r in running if r.req_pool_idx is not None]
        self.cache.check_integrity(holders)
        rows = {r.req_pool_idx for r in holders}
        assert len(rows) == len(holders), "two running requests share a table row"
        assert self.table.available() + len(rows) == self.num_rows, "leaked table rows"

    def is_empty(self, running: Iterable["Req"] = ()) -> bool:
        """Every slot free or cached, every row free (nothing holds memory)."""
        return (not any(r.req_pool_idx is not None for r in running)
                and self.slots.available() + self.cache.total_size() == self.capacity
                and self.table.available() == self.num_rows)
