"""Radix cache (RadixAttention): a radix tree over token ids whose nodes own runs of KV slots.

Owner: the scheduler, on the event loop. Everything here is CPU bookkeeping; the KV
tensors themselves are only ever addressed through the slot ids stored in the nodes.

Ownership rule (checked by `check_integrity` and by the tests after every step). Every
KV slot 1..capacity is owned by exactly one of:

- the allocator's free list;
- one tree node (`node.value` holds its slots, one per token of `node.key`);
- one running request, as its *private tail*: a request that holds a lock on
  `req.cache_node` (depth d) and has slots for positions [0, req.num_computed) in its
  `req_to_token` row references the tree's slots for positions < d and owns the slots of
  positions [d, num_computed) itself.

So `free + private + tree == capacity`, and a node's `lock_ref` equals the number of
requests (or other holders) whose locked node lies in its subtree. Locked nodes are never
evicted or flushed; only unlocked leaves are evicted, least recently used first.

Keys live in namespaces (LoRA adapters, later image hashes): each namespace has its own
root, so keys of different namespaces never share nodes or slots. A request's namespace is
`getattr(req, "cache_namespace", None)`.

With `disable=True` (`--disable-radix-cache`) the same interface caches nothing: matches
are empty, inserts free what they are given and finished requests free all their slots.

What its caller (asgl/engine/scheduler/memory.py, the only one) must do:

- A request's slots are `req_to_token[req.req_pool_idx, :req.num_computed]`: num_computed
  counts every position with an allocated slot (it may run one past `fill_ids` while the
  input token is in flight; only `fill_ids[:num_computed]` is ever cached).
- Admission: `m = match_prefix(...)`, then `inc_lock(m.node)` *before* allocating or
  evicting, write `m.slots` to row[:m.length], set `req.cache_node = m.node`,
  `req.num_computed = m.length`. A peek's node must not be locked.
- `cache_unfinished_req` only when no step in flight still writes the request's KV;
  `cache_finished_req` (finish, abort, retraction) only when no step uses it any more.
- Never free a request's slots below `depth(req.cache_node)`: they are the tree's.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from asgl.engine.scheduler.slots import ReqToTokenPool, TokenSlotAllocator

_EMPTY = torch.empty(0, dtype=torch.int64)
_node_ids = itertools.count()


class TreeNode:
    """A run of tokens (`key`) and their KV slots (`value`); a root has an empty key."""

    __slots__ = ("key", "value", "children", "parent", "lock_ref", "last_access", "depth",
                 "namespace", "id")

    def __init__(self, key: tuple = (), value: torch.Tensor = _EMPTY,
                 parent: Optional[TreeNode] = None, namespace: Optional[str] = None):
        self.key = key
        self.value = value
        self.children: dict[int, TreeNode] = {}  # keyed by the child's first token id
        self.parent = parent
        self.lock_ref = 0
        self.last_access = 0
        # tokens from the root to the end of this node: stable when an ancestor splits
        self.depth = parent.depth + len(key) if parent is not None else 0
        self.namespace = namespace
        self.id = next(_node_ids)

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __repr__(self) -> str:
        head = list(self.key[:6]) + (["..."] if len(self.key) > 6 else [])
        return f"Node#{self.id}(key={head}, len={len(self.key)}, lock={self.lock_ref})"


@dataclass(frozen=True)
class MatchResult:
    slots: torch.Tensor  # CPU int64 KV slots of the matched prefix, one per token
    node: TreeNode  # deepest node of the match (a root when nothing matched): lock it
    length: int


def _depth(node: Optional[TreeNode]) -> int:
    return 0 if node is None else node.depth


def _common_len(node_key: tuple, key: Sequence[int], start: int) -> int:
    n = min(len(node_key), len(key) - start)
    if tuple(key[start:start + n]) == node_key[:n]:
        return n
    i = 0
    while i < n and node_key[i] == key[start + i]:
        i += 1
    return i


def _check(cond: bool, msg: str, *args) -> None:
    """Assert; `msg.format(*args)` is only built on failure (node reprs are not free)."""
    if not cond:
        raise AssertionError("radix cache integrity: " + (msg.format(*args) if args else msg))


class RadixCache:
    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: TokenSlotAllocator,
                 disable: bool = False):
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.disable = disable
        self._clock = 0  # logical time for LRU: deterministic, bumped by each match/insert
        self._clear_tree()

    def _clear_tree(self) -> None:
        # bumped whenever a match could return another length or node (a node added,
        # split or evicted, a flush): peek results cached by the scheduler stay valid
        # while it stays the same
        self.version = getattr(self, "version", 0) + 1
        self._roots: dict[Optional[str], TreeNode] = {}
        self._evictable = 0
        self._protected = 0

    # ------------------------------------------------------------------ sizes
    def evictable_size(self) -> int:
        """Tokens held by unlocked nodes (what `evict` could free)."""
        return self._evictable

    def protected_size(self) -> int:
        """Tokens held by locked nodes."""
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    # ------------------------------------------------------------------ tree
    def match_prefix(self, key: Sequence[int], namespace: Optional[str] = None,
                     max_len: Optional[int] = None, *, peek: bool = False) -> MatchResult:
        """The longest cached prefix of `key[:max_len]` in `namespace`.

        A node that the match ends inside is split, so `node` covers exactly `length`
        tokens; every node on the path becomes most recently used. The caller that uses
        the slots must `inc_lock(node)` before anything can evict (i.e. before allocating).
        `peek=True` only measures (scheduling order): no split, no LRU update, no metrics;
        its `length`/`slots` may end inside `node`'s child, so never lock a peek's node.
        """
        key = key if max_len is None else key[:max(max_len, 0)]
        root = None if self.disable else self._roots.get(namespace)
        if root is None:
            result = MatchResult(_EMPTY, TreeNode(namespace=namespace), 0)
        else:
            node, length, values = self._walk(root, key, modify=not peek)
            result = MatchResult(torch.cat(values) if values else _EMPTY, node, length)
        return result

    def insert(self, key: Sequence[int], slots: torch.Tensor,
               namespace: Optional[str] = None) -> int:
        """Cache `key` with KV `slots` (one per token); returns how many leading tokens
        were already cached.

        The tree takes ownership of `slots[ret:]`. For `slots[:ret]` the tree keeps its own
        slots: those of the caller that differ are duplicates the caller must free (the
        request helpers below do it). Disabled: frees `slots` and returns 0.
        """
        assert len(key) == slots.numel(), f"{len(key)} tokens but {slots.numel()} slots"
        if self.disable:
            self.allocator.free(slots)
            return 0
        if not key:
            return 0
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = TreeNode(namespace=namespace)
        node, pos, _ = self._walk(root, key, modify=True)
        if pos < len(key):
            leaf = TreeNode(tuple(key[pos:]), slots[pos:].to("cpu", torch.int64).clone(), node,
                            namespace)
            leaf.last_access = self._clock
            node.children[leaf.key[0]] = leaf
            self._evictable += len(leaf.key)
            self.version += 1
        return pos

    def _walk(self, root: TreeNode, key: Sequence[int], modify: bool):
        """(deepest node, matched length, slot runs) of `key`; splits and touches if modify."""
        if modify:
            self._clock += 1
            root.last_access = self._clock
        node, pos, values = root, 0, []
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = _common_len(child.key, key, pos)
            if n < len(child.key):  # the match ends inside `child`
                if not modify:
                    values.append(child.value[:n])
                    pos += n
                    break
                child = self._split(child, n)
            if modify:
                child.last_access = self._clock
            values.append(child.value)
            node, pos = child, pos + n
        return node, pos, values

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after its first `n` tokens; returns the new upper node."""
        self.version += 1
        parent = child.parent
        upper = TreeNode(child.key[:n], child.value[:n], parent, child.namespace)
        upper.lock_ref = child.lock_ref  # same subtree, same holders
        upper.last_access = child.last_access
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        upper.children[child.key[0]] = child
        parent.children[upper.key[0]] = upper
        return upper

    def inc_lock(self, node: Optional[TreeNode]) -> None:
        """Lock the path root→node against eviction (reference counted; roots: no-op)."""
        while node is not None and not node.is_root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock(self, node: Optional[TreeNode]) -> None:
        """Undo one `inc_lock(node)`."""
        while node is not None and not node.is_root:
            _check(node.lock_ref > 0, "dec_lock below zero on {}", node)
            if node.lock_ref == 1:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node.lock_ref -= 1
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots by evicting unlocked leaves, least recently used
        first (a parent left childless becomes a candidate); returns slots freed (may be
        fewer when nothing more is evictable)."""
        if self.disable or num_tokens <= 0:
            return 0
        heap = [(n.last_access, n.id, n) for n in self._nodes()
                if not n.is_root and not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            self.allocator.free(node.value)
            freed += len(node.key)
            self.version += 1
            self._evictable -= len(node.key)
            parent = node.parent
            del parent.children[node.key[0]]
            if not parent.children:
                if not parent.is_root and parent.lock_ref == 0:
                    heapq.heappush(heap, (parent.last_access, parent.id, parent))
                elif parent.is_root and parent.namespace is not None:
                    del self._roots[parent.namespace]  # drop empty namespaces
        return freed

    def reset(self) -> bool:
        """Flush: free every cached slot. Refused (False) while any node is locked. Running
        requests that hold no lock keep their private slots, so this is always safe."""
        if self._protected > 0:
            return False
        for node in self._nodes():
            if not node.is_root:
                self.allocator.free(node.value)
        self._clear_tree()
        return True

    def _nodes(self) -> Iterable[TreeNode]:
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ------------------------------------------------------------------ requests
    # A request's slots are req_to_token[req.req_pool_idx, :req.num_computed]; positions
    # < depth(req.cache_node) are the tree's, the rest are its private tail. fill_ids may
    # be shorter than num_computed (a position whose input token is still in flight).

    def _row_slots(self, row: int, n: int) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token[row, :n].to("cpu").clone()

    def cache_finished_req(self, req) -> None:
        """Release a finished (or retracted) request: its computed tokens go into the tree,
        duplicate and uncached slots are freed, its lock and its req_to_token row are given
        back (req.req_pool_idx = req.cache_node = None). No step may still use its KV."""
        row = req.req_pool_idx
        if row is not None:
            slots = self._row_slots(row, req.num_computed)
            if self.disable:
                self.allocator.free(slots)
            else:
                key = req.key_ids
                n = min(req.num_computed, len(key))
                d = _depth(req.cache_node)
                cached = self.insert(key[:n], slots[:n], _namespace(req))
                assert cached >= d, "the request's locked prefix is not in the tree"
                self.allocator.free(slots[d:cached])  # duplicates of cached tokens
                self.allocator.free(slots[n:])  # computed for a token that never came
            self.req_to_token_pool.free(row)
            req.req_pool_idx = None
        self.dec_lock(req.cache_node)
        req.cache_node = None

    def cache_unfinished_req(self, req) -> None:
        """Insert a running request's computed tokens so that forks and siblings hit its
        in-flight prefix. Its duplicates are freed and its row re-pointed to the tree's
        slots; its lock moves to the new deepest node (req.cache_node), so afterwards all
        its computed tokens are tree-owned. The KV of those tokens must be written."""
        row = req.req_pool_idx
        key = req.key_ids
        n = min(req.num_computed, len(key))
        if self.disable or row is None or n == 0:
            return
        key, ns, d = key[:n], _namespace(req), _depth(req.cache_node)
        slots = self._row_slots(row, n)
        cached = self.insert(key, slots, ns)
        assert cached >= d, "the request's locked prefix is not in the tree"
        self.allocator.free(slots[d:cached])
        node, length, values = self._walk(self._roots[ns], key, modify=True)
        assert length == n and node.depth == n
        if cached > d:
            self.req_to_token_pool.write(row, d, torch.cat(values)[d:cached])
        self.inc_lock(node)
        self.dec_lock(req.cache_node)
        req.cache_node = node

    def release_req(self, req, keep_tokens: int) -> None:
        """Roll a running request back to its first `keep_tokens` positions (jump-forward,
        partial retraction): its private slots past them are freed, and if they end inside
        its locked path the lock moves up to a node ending exactly there (splitting one).
        Sets req.num_computed = min(num_computed, keep_tokens); the row stays allocated."""
        row = req.req_pool_idx
        keep = max(0, keep_tokens)
        if row is None or keep >= req.num_computed:
            return
        d = _depth(req.cache_node)
        self.allocator.free(self._row_slots(row, req.num_computed)[max(keep, d):])
        if keep < d:  # move the lock up to a node ending exactly at `keep`
            node = None
            if keep > 0:
                node = req.cache_node
                while node.parent.depth >= keep:
                    node = node.parent
                if node.depth > keep:
                    node = self._split(node, keep - node.parent.depth)
            self.inc_lock(node)
            self.dec_lock(req.cache_node)
            req.cache_node = node
        req.num_computed = keep

    # ------------------------------------------------------------------ debugging
    def pretty_print(self) -> str:
        lines = [f"RadixCache(evictable={self._evictable}, protected={self._protected})"]
        stack = [(r, 0) for r in self._roots.values()]
        while stack:
            node, indent = stack.pop()
            if node.is_root:
                lines.append(f"root[{node.namespace!r}]")
            else:
                lines.append("  " * indent + f"{node} t={node.last_access} "
                             f"slots={node.value.tolist()[:6]}")
            stack.extend((c, indent + 1) for c in node.children.values())
        text = "\n".join(lines)
        print(text)
        return text

    def check_integrity(self, running_reqs: Iterable = (),
                        extra_locked: Iterable[TreeNode] = ()) -> None:
        """Raise AssertionError unless every slot is free, private to exactly one of
        `running_reqs` (requests holding a req_to_token row) or owned by exactly one node,
        and every node's lock count equals the holders (requests' cache_node plus
        `extra_locked`) in its subtree. For tests and --debug-check-integrity: O(capacity)."""
        running_reqs = list(running_reqs)
        owners: list[tuple[object, torch.Tensor]] = [("the free list", self.allocator.free_slots())]
        _check(owners[0][1].numel() == self.allocator.available(), "a slot freed twice")
        holders: Counter = Counter()
        for node in [r.cache_node for r in running_reqs] + list(extra_locked):
            while node is not None and not node.is_root:
                holders[node] += 1
                node = node.parent
        sizes = [0, 0]  # [evictable, protected]
        for node in self._nodes():
            if node.is_root:
                _check(self._roots.get(node.namespace) is node and not node.key,
                       "bad root {}", node)
                continue
            _check(len(node.key) == node.value.numel() > 0, "{}: key/slot lengths", node)
            _check(node.parent.children.get(node.key[0]) is node, "{}: bad parent link", node)
            _check(node.depth == node.parent.depth + len(node.key), "{}: bad depth", node)
            _check(node.lock_ref >= 0, "{}: negative lock count", node)
            _check(node.lock_ref == holders[node], "{}: lock count != {} holders", node,
                   holders[node])
            sizes[node.lock_ref > 0] += len(node.key)
            owners.append((node, node.value))
        _check(sizes == [self._evictable, self._protected],
               f"evictable/protected {sizes} != counters {[self._evictable, self._protected]}")
        num_tree = sum(len(v) for _, v in owners[1:])
        for req in running_reqs:
            _check(req.req_pool_idx is not None, "running {} has no row", req.rid)
            row = self._row_slots(req.req_pool_idx, req.num_computed)
            node, path = req.cache_node, []
            d = _depth(node)
            _check(d <= req.num_computed, "{} locks {} > num_computed tokens", req.rid, d)
            while node is not None and not node.is_root:
                _check(node.parent.children.get(node.key[0]) is node,
                       "{} holds detached {}", req.rid, node)
                path.append(node.value)
                node = node.parent
            _check(node is None or not path or self._roots.get(node.namespace) is node,
                   "{} holds a node of a flushed tree", req.rid)
            _check(torch.equal(row[:d], torch.cat(path[::-1]) if path else _EMPTY),
                   "{}: row does not match its cached prefix", req.rid)
            owners.append((f"request {req.rid}", row[d:]))
        self._check_partition(owners, num_tree)

    def _check_partition(self, owners: list[tuple[object, torch.Tensor]], num_tree: int) -> None:
        """Every slot 1..capacity appears exactly once among the owners (free list first)."""
        cap = self.allocator.capacity
        every = torch.cat([v for _, v in owners])
        bad = every[(every < 1) | (every > cap)]
        if bad.numel():
            who = next(w for w, v in owners if (v == bad[0]).any())
            _check(False, "{} holds slot {}, outside 1..{}", who, bad[0].item(), cap)
        twice = (torch.bincount(every, minlength=cap + 1) > 1).nonzero().flatten()
        if twice.numel():
            s = twice[0].item()
            who = [w for w, v in owners for _ in range(int((v == s).sum()))]
            _check(False, "slot {} is owned by both {} and {}", s, who[0], who[1])
        num_free = owners[0][1].numel()
        num_private = every.numel() - num_free - num_tree
        _check(every.numel() == cap, f"free {num_free} + private {num_private} + tree {num_tree}"
               f" = {every.numel()} != capacity {cap}: slots leaked")


def _namespace(req) -> Optional[str]:
    return req.cache_namespace
