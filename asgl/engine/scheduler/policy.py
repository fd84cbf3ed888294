"""Scheduling policies: the order in which waiting requests are considered for admission.

`--schedule-policy`: `lpm` (default) longest cached prefix first; `dfs-weight` walks the
radix tree depth-first, heaviest subtree first, so requests sharing a cached prefix are
admitted together; `fcfs`; `lof` (longest output first); `random`. Past LPM_MAX_QUEUE
waiting requests the cache-aware policies fall back to fcfs (a prefix match per waiting
request per step costs too much), and a request waiting longer than STARVATION_SECONDS
goes first whatever the policy.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from asgl.engine.scheduler.radix_cache import MatchResult
    from asgl.engine.scheduler.req import Req

# lpm costs a prefix match per waiting request per step; past this queue length the
# ordering is not worth it (SGLang does the same).
LPM_MAX_QUEUE = 128
# A request waiting longer than this goes first whatever the policy: nobody starves.
STARVATION_SECONDS = 10.0
POLICIES = ("lpm", "dfs-weight", "fcfs", "lof", "random")


def order_waiting(waiting: list["Req"], policy: str, peek: Callable[["Req"], "MatchResult"],
                  rng: random.Random) -> list["Req"]:
    """`waiting` in admission order under `policy`; `peek(req)` is its cached prefix
    (a match that changes nothing)."""
    if len(waiting) < 2:
        return waiting
    now = time.monotonic()
    if policy in ("lpm", "dfs-weight") and len(waiting) > LPM_MAX_QUEUE:
        policy = "fcfs"
    key = None
    if policy in ("lpm", "dfs-weight"):
        matches = [peek(r) for r in waiting]
        if policy == "dfs-weight":
            waiting = dfs_weight_order(waiting, [m.node for m in matches])
        else:
            lens = {id(r): m.length for r, m in zip(waiting, matches)}
            key = lambda r: -lens[id(r)]  # noqa: E731
    elif policy == "lof":
        key = lambda r: -r.max_new_tokens  # noqa: E731
    elif policy == "random":
        waiting = list(waiting)
        rng.shuffle(waiting)
    if key is not None:
        waiting = sorted(waiting, key=key)  # stable: arrival order among equals
    # Starving requests first, in arrival order.
    old = [r for r in waiting if now - r.arrival_time > STARVATION_SECONDS]
    if old:
        rest = [r for r in waiting if now - r.arrival_time <= STARVATION_SECONDS]
        waiting = sorted(old, key=lambda r: r.arrival_time) + rest
    return waiting


def dfs_weight_order(reqs: list[Req], nodes: list) -> list[Req]:
    """SGLang's dfs-weight order: walk the radix tree depth-first from each root, at every
    node visiting first the child subtrees that hold the most waiting requests (the
    requests whose cached match ends in them), then the requests that end at the node
    itself, in arrival order. Requests sharing a cached prefix come out together, the
    biggest groups first, so their prefix is hot (and locked) while they run.

    `nodes[i]` is the deepest tree node of reqs[i]'s cached prefix (a peek match)."""
    at: dict[int, list[Req]] = {}  # node -> requests whose match ends there
    weight: dict[int, int] = {}  # node -> requests in its subtree
    kids: dict[int, list] = {}  # node -> children on the way to some request's node
    listed: set[int] = set()
    tops: list = []
    for req, node in zip(reqs, nodes):
        at.setdefault(id(node), []).append(req)
        child, cur = None, node
        while cur is not None:
            weight[id(cur)] = weight.get(id(cur), 0) + 1
            if child is not None and id(child) not in listed:
                listed.add(id(child))
                kids.setdefault(id(cur), []).append(child)
            if cur.parent is None and id(cur) not in listed:
                listed.add(id(cur))
                tops.append(cur)
            child, cur = cur, cur.parent
    out: list[Req] = []
    # heaviest first; sorted() is stable, so ties keep the order requests reached them
    stack: list = sorted(tops, key=lambda n: -weight[id(n)])[::-1]
    while stack:
        item = stack.pop()
        if isinstance(item, list):  # a node's own requests, after its subtrees
            out.extend(item)
            continue
        if id(item) in at:
            stack.append(at[id(item)])
        stack.extend(sorted(kids.get(id(item), []), key=lambda n: -weight[id(n)])[::-1])
    return out
