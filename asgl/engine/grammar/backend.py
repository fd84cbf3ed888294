"""Constrained decoding on xgrammar: compiled grammars, per-request matchers, step masks.

Three objects, three owners:

- `GrammarBackend` (one per engine, on the event loop): the tokenizer's xgrammar
  `TokenizerInfo`, a compiler, and a bounded LRU of compiled grammars keyed by
  (kind, spec). `await compile(kind, spec)` runs xgrammar in a small thread pool, so a
  slow schema never stalls the loop; identical concurrent requests share one compilation.
  Anything wrong with a spec (syntax, unenforceable keyword, too slow to compile) is an
  `InvalidRequest` (HTTP 400) before the request is queued.
- `GrammarState` (one per request, `req.grammar`): the matcher. The output processor
  feeds it each accepted token; jump-forward rolls it back and feeds forced tokens.
- `GrammarStep` (one per step with constrained rows, `SamplingBatch.grammar`): the token
  bitmask of each row. With overlap scheduling step N+1 is submitted before step N's
  tokens are accepted, so the mask cannot be built with the batch: the engine fills it on
  the loop right after applying step N, and the worker waits for it just before sampling
  (the forward pass of N+1 runs meanwhile). Constrained requests so keep their place in
  every step, and filling the masks overlaps the device's work.

Kinds: "regex", "json_schema", "ebnf" and "structural_tag" (xgrammar's tag format; tool
calls are built from it). Vocabulary: the model's (its logits width), which may exceed
the tokenizer's; ids past the tokenizer's are never allowed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import xgrammar as xgr

from asgl.engine.grammar.specs import (check_spec_text, json_strings_without_surrogates,
                                       normalize_json_schema, normalize_structural_tag,
                                       parse_json_schema, python_regex)
from asgl.engine.contracts.outputs import FinishReason
from asgl.engine.contracts.errors import InvalidRequest

if TYPE_CHECKING:
    from asgl.engine.scheduler.req import Req

logger = logging.getLogger(__name__)

CACHE_MAX_ENTRIES = 256
CACHE_MAX_BYTES = 512 << 20
COMPILE_TIMEOUT_S = 30.0
# The worker waits this long for a step's masks; they come within one step of the loop.
_FILL_TIMEOUT_S = 300.0
# Masks of this many rows are filled by xgrammar's threaded batch filler.
_BATCH_FILL_MIN_ROWS = 4
# JSON formatting of generated objects: compact separators, no free whitespace (fewer
# tokens, long forced runs for jump-forward, no whitespace loops at high temperature).
_JSON_OPTIONS = dict(any_whitespace=False, strict_mode=True)
_XGR_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: ")


class GrammarBackend:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int], *,
                 max_entries: int = CACHE_MAX_ENTRIES, max_bytes: int = CACHE_MAX_BYTES,
                 compile_threads: int = 2):
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        # xgrammar's own cache is unbounded by entries: ours replaces it.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=compile_threads,
                                            cache_enabled=False)
        self.words = (vocab_size + 31) // 32
        stop = torch.zeros(self.words * 32, dtype=torch.bool)
        stop[list(self.info.stop_token_ids)] = True
        # int32 words with the bits of non-stop tokens set: a mask & this == 0 allows
        # nothing but stopping
        self.not_stop = _pack_bits(~stop)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._cache: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._cache_bytes = 0
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self._pool = ThreadPoolExecutor(compile_threads, thread_name_prefix="asgl-grammar")
        threads = max(1, min(8, (os.cpu_count() or 2) // 2))
        self._batch_filler = xgr.BatchGrammarMatcher(max_threads=threads)
        self.min_jump_chars = 1  # the engine raises it under overlap (jump_forward.py)

    # ------------------------------------------------------------------ compiling
    async def compile(self, kind: str, spec: str) -> Any:
        """The compiled grammar of (kind, spec); InvalidRequest if it cannot be enforced."""
        key = (kind, check_spec_text(kind, spec))
        hit = self._lookup(key)
        if hit is not None:
            return hit
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().run_in_executor(self._pool, self._compile, kind, spec)
            self._inflight[key] = fut
            fut.add_done_callback(lambda f, key=key: self._store(key, f))
        try:
            # shield: a cancelled or timed-out waiter leaves the compilation (and its
            # cache entry) to the others
            return await asyncio.wait_for(asyncio.shield(fut), COMPILE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise InvalidRequest(f"the {kind} took longer than {COMPILE_TIMEOUT_S:.0f} s to "
                                 f"compile; simplify it", kind) from None

    def compile_sync(self, kind: str, spec: str) -> Any:
        """Blocking compile through the cache (tests, benchmarks)."""
        key = (kind, check_spec_text(kind, spec))
        hit = self._lookup(key)
        if hit is not None:
            return hit
        try:
            compiled = self._compile(kind, spec)
        except InvalidRequest as e:
            self._insert(key, e, 0)
            raise
        self._insert(key, compiled, compiled.memory_size_bytes)
        return compiled

    def _lookup(self, key: tuple[str, str]) -> Any:
        entry = self._cache.get(key)
        if entry is None:
            return None
        self._cache.move_to_end(key)
        if isinstance(entry[0], InvalidRequest):
            raise InvalidRequest(str(entry[0]), entry[0].param)
        return entry[0]

    def _store(self, key: tuple[str, str], fut: asyncio.Future) -> None:
        self._inflight.pop(key, None)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            compiled = fut.result()
            self._insert(key, compiled, compiled.memory_size_bytes)
        elif isinstance(exc, InvalidRequest):
            self._insert(key, exc, 0)  # a bad spec sent again is refused without compiling

    def _insert(self, key: tuple[str, str], value: Any, size: int) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= old[1]
        self._cache[key] = (value, size)
        self._cache_bytes += size
        while self._cache and (len(self._cache) > self.max_entries
                               or self._cache_bytes > self.max_bytes):
            _, (_, evicted) = self._cache.popitem(last=False)
            self._cache_bytes -= evicted

    def cache_info(self) -> dict:
        return {"entries": len(self._cache), "bytes": self._cache_bytes,
                "max_entries": self.max_entries, "max_bytes": self.max_bytes,
                "compiling": len(self._inflight)}

    def _compile(self, kind: str, spec: str) -> Any:
        """Runs in the thread pool: normalize the spec, then let xgrammar compile it."""
        c = self.compiler
        try:
            if kind == "regex":
                return c.compile_regex(python_regex(spec))
            if kind == "json_schema":
                schema = normalize_json_schema(parse_json_schema(spec))
                grammar = xgr.Grammar.from_json_schema(json.dumps(schema), **_JSON_OPTIONS)
                return c.compile_grammar(json_strings_without_surrogates(str(grammar)))
            if kind == "ebnf":
                return c.compile_grammar(spec)
            if kind == "structural_tag":
                return c.compile_structural_tag(normalize_structural_tag(spec))
        except InvalidRequest:
            raise
        except RecursionError:
            raise InvalidRequest(f"the {kind} is nested too deeply", kind) from None
        except Exception as e:  # xgrammar reports bad specs as RuntimeError, ValueError, ...
            raise InvalidRequest(f"invalid {kind}: {_clean(e)}", kind) from None
        raise InvalidRequest(f"unknown grammar kind {kind!r}", kind)

    # ------------------------------------------------------------------ requests and steps
    def new_state(self, compiled: Any, jump_forward: bool) -> "GrammarState":
        return GrammarState(xgr.GrammarMatcher(compiled), self.min_jump_chars
                            if jump_forward else 0)

    def step(self, reqs: Sequence[Req], pinned: bool) -> Optional["GrammarStep"]:
        """The mask holder of a step sampling `reqs`, or None if none is constrained;
        `pinned`: its host masks are page-locked (the device copies them without a sync)."""
        if all(r.grammar is None for r in reqs):
            return None
        return GrammarStep(self, reqs, pinned)

    def must_stop(self, state: "GrammarState") -> bool:
        """Whether the grammar is complete and admits nothing but a stop token."""
        if not state.matcher.is_completed():
            return False
        scratch = torch.empty((1, self.words), dtype=torch.int32)
        state.matcher.fill_next_token_bitmask(scratch, 0)
        return not bool(((scratch[0] & self.not_stop) != 0).any())

    def fill_rows(self, bitmask: torch.Tensor, rows: list[int], states: list["GrammarState"]
                  ) -> None:
        matchers = [s.matcher for s in states]
        if len(rows) >= _BATCH_FILL_MIN_ROWS:
            self._batch_filler.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        else:
            for row, m in zip(rows, matchers):
                m.fill_next_token_bitmask(bitmask, row)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GrammarState:
    """One request's matcher. `jump_pending`: the grammar now forces a continuation of at
    least `min_jump` characters, which the scheduler appends without decoding it
    (jump_forward.py); min_jump == 0 turns jump-forward off for this request."""

    __slots__ = ("matcher", "min_jump", "jump_pending")

    def __init__(self, matcher: Any, min_jump: int):
        self.matcher = matcher
        self.min_jump = min_jump
        self.jump_pending = False
        self._update_jump()

    def accept(self, token: int) -> Optional[FinishReason]:
        """Advance by a sampled token; a finish reason when that ends the request."""
        if not self.matcher.accept_token(token):
            # cannot happen with the mask applied; never let a bad token pass unnoticed
            return FinishReason("abort", message=f"token {token} does not fit the grammar")
        if self.matcher.is_terminated():
            return FinishReason("stop", matched=token)
        self._update_jump()
        return None

    def accept_forced(self, tokens: Sequence[int]) -> bool:
        """Accept all of `tokens` or none of them (the matcher is left as it was)."""
        accepted = 0
        for t in tokens:  # forced text holds no stop token, so it never terminates
            if not self.matcher.accept_token(t):
                self.rollback(accepted)
                return False
            accepted += 1
        self._update_jump()
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def jump_string(self) -> str:
        try:
            return self.matcher.find_jump_forward_string()
        except UnicodeDecodeError:  # the forced bytes end inside a character
            return ""

    def _update_jump(self) -> None:
        self.jump_pending = bool(self.min_jump) and len(self.jump_string()) >= self.min_jump


class GrammarStep:
    """Token bitmasks of one step's sampling rows (all-allowed for unconstrained rows).

    `fill` runs on the loop once the previous step's tokens are accepted and always
    releases the worker; `apply` runs in the worker thread inside the sampler."""

    def __init__(self, backend: GrammarBackend, reqs: Sequence[Req], pinned: bool):
        self.backend = backend
        self.reqs = list(reqs)
        self.bitmask = torch.full((len(reqs), backend.words), -1, dtype=torch.int32,
                                  pin_memory=pinned)
        self._ready = threading.Event()

    def fill(self) -> list[tuple[Req, FinishReason]]:
        """Fill the masks; returns the requests the grammar ends now: complete with nothing
        but a stop token allowed (finished as "stop" without another step), or with no
        token allowed at all (cannot be satisfied: "abort"). A matcher that raises ends its
        own request ("abort", grammar error); the others keep their masks."""
        ended: list[tuple[Req, FinishReason]] = []
        try:
            live = [(i, r) for i, r in enumerate(self.reqs)
                    if r.grammar is not None and not r.finished]
            if not live:
                return ended
            rows = [i for i, _ in live]
            try:
                self.backend.fill_rows(self.bitmask, rows, [r.grammar for _, r in live])
            except Exception:  # one matcher's fault, probably: find it, keep the others
                logger.exception("filling grammar masks failed: filling row by row")
                live = self._fill_each(live, ended)
                rows = [i for i, _ in live]
                if not live:
                    return ended
            masks = self.bitmask if len(rows) == len(self.reqs) else self.bitmask[rows]
            any_token = masks.any(dim=1).tolist()  # (int32 words: no temporaries)
            not_stop = self.backend.not_stop
            for (row, req), has_token in zip(live, any_token):
                if not has_token:
                    reason = FinishReason("abort", message="the grammar admits no further token")
                elif req.grammar.matcher.is_completed() and \
                        not (self.bitmask[row] & not_stop).any():
                    reason = FinishReason("stop")  # complete, and only a stop token may follow
                else:
                    continue
                ended.append((req, reason))
                self.bitmask[row] = -1  # its token is discarded; keep the row samplable
        except Exception:
            logger.exception("filling grammar masks failed")
            self.bitmask.fill_(-1)
            ended = [(r, FinishReason("abort", message="grammar error"))
                     for r in self.reqs if r.grammar is not None and not r.finished]
        finally:
            self._ready.set()
        return ended

    def _fill_each(self, live: list, ended: list) -> list:
        """Fill the rows one at a time; a request whose matcher raises is ended with a
        grammar error (its row left samplable). Returns the rows that filled."""
        filled = []
        for row, req in live:
            try:
                req.grammar.matcher.fill_next_token_bitmask(self.bitmask, row)
                filled.append((row, req))
            except Exception as exc:  # noqa: BLE001 - this request's grammar only
                self.bitmask[row] = -1
                ended.append((req, FinishReason(
                    "abort", message=f"grammar error: {type(exc).__name__}")))
        return filled

    def apply(self, logits: torch.Tensor) -> None:
        """Worker thread: wait for the masks, then set disallowed logits to -inf."""
        if not self._ready.wait(_FILL_TIMEOUT_S):
            raise RuntimeError("grammar masks were not filled in time")
        mask = self.bitmask
        if mask.device != logits.device:
            mask = mask.to(logits.device, non_blocking=True)
        apply_bitmask(logits, mask)


_xgr_kernel_ok = True


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """logits[i, t] = -inf where bit t of mask[i] is 0. xgrammar's kernel (CPU, CUDA); if
    it cannot run on this device, a torch version (one [S, V] bool temporary)."""
    global _xgr_kernel_ok
    if _xgr_kernel_ok:
        try:
            xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=logits.shape[-1])
            return
        except Exception as e:  # e.g. no kernel build for this GPU
            logger.warning("xgrammar's bitmask kernel failed (%s): using torch", e)
            _xgr_kernel_ok = False
    apply_bitmask_torch(logits, mask)


def apply_bitmask_torch(logits: torch.Tensor, mask: torch.Tensor) -> None:
    shifts = torch.arange(32, dtype=torch.int32, device=mask.device)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    allowed = bits.view(mask.shape[0], -1)[:, :logits.shape[-1]].bool()
    logits.masked_fill_(~allowed, float("-inf"))


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A bool vector (length a multiple of 32) as int32 words, bit j of word w = bits[32w+j]."""
    words = bits.view(-1, 32).to(torch.int64)
    packed = (words << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def _clean(exc: Exception) -> str:
    """xgrammar's message without its log prefix and C++ file position."""
    text = str(exc).strip().splitlines()
    text = " ".join(line.strip() for line in text if line.strip()) or type(exc).__name__
    return _XGR_LOG_PREFIX.sub("", text)
