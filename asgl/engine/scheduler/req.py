"""Req: one sequence being generated, as the scheduler sees it.

Owner: the scheduler (on the event loop). The worker thread never touches a Req: it sees
only ForwardBatch tensors. Token bookkeeping follows "schedule tokens, not phases": a
request has `fill_ids` (prompt + output so far) and `num_computed` (how many of them have
their KV in the pool), so prefix hits, prefill chunks, decode steps and retraction are all
the same arithmetic.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from asgl.engine.contracts.outputs import FinishReason
from asgl.engine.contracts.sampling_params import SamplingParams


class ReqState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int  # resolved: the user's seed, or one drawn from the engine's generator
    eos_ids: frozenset[int] = frozenset()
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: no prompt logprobs
    top_logprobs_num: int = 0
    arrival_time: float = 0.0
    cache_namespace: Optional[str] = None  # prefix-cache namespace (LoRA adapter, images)
    first_scheduled_time: Optional[float] = None
    # images (engine/contracts/multimodal.py MMInputs), and the prompt as the radix cache
    # keys it (image positions by their image's digest); None for text-only requests
    mm: Any = None
    cache_prompt_ids: Optional[list[int]] = None

    output_ids: list[int] = field(default_factory=list)
    state: ReqState = ReqState.WAITING
    finish_reason: Optional[FinishReason] = None

    # KV bookkeeping (scheduler-owned)
    req_pool_idx: Optional[int] = None
    num_computed: int = 0  # tokens of fill_ids whose KV is in the pool
    num_cached: int = 0  # prompt tokens served from the radix cache (reported to users)
    cache_node: Any = None  # radix node this request holds a lock on
    num_retractions: int = 0

    # Overlap bookkeeping: sampled tokens not yet appended to output_ids, steps that use
    # this request and are not processed yet, and this request's row among the sampled
    # tokens of its latest step (what a placeholder id points at).
    num_inflight: int = 0
    inflight_steps: int = 0
    extra_sample_row: int = 0

    # next prompt position whose logprob is still to be scheduled (prompt logprobs)
    prompt_lp_next: int = 0
    # logprobs gathered so far: lists of (logprob, token_id) and top-k alternatives
    output_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    prompt_top_logprobs: list = field(default_factory=list)

    # Opaque per-request state of other layers (detokenizer, grammar matcher, stream sink).
    detok: Any = None
    grammar: Any = None
    sink: Any = None
    sink_index: int = 0  # which of the user request's n choices this is
    sent_first_chunk: bool = False

    @property
    def fill_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def key_ids(self) -> list[int]:
        """fill_ids as the radix cache keys them (images by their digest)."""
        if self.cache_prompt_ids is None:
            return self.prompt_ids + self.output_ids
        return self.cache_prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def input_logprobs(self) -> tuple[Optional[list], Optional[list]]:
        """Prompt logprobs as reported: the first prompt token has none."""
        if not self.return_logprob or self.logprob_start_len < 0:
            return None, None
        first = [(None, self.prompt_ids[0])] if self.logprob_start_len == 0 else []
        top = None
        if self.top_logprobs_num:
            top = [None] * len(first) + list(self.prompt_top_logprobs)
        return first + list(self.prompt_logprobs), top

    def __post_init__(self) -> None:
        # read per request per step: a plain attribute, not a property
        m = self.sampling.max_new_tokens
        self.max_new_tokens: int = 1 << 30 if m is None else m
