"""The one attention interface every backend (torch, triton, flashinfer) implements.

Models never call a kernel directly: each attention layer holds an `AttentionSpec`
and calls `batch.attn_backend.forward(q, k, v, spec, batch)`. A backend:

1. `prepare(batch)` once per step, before the model runs (build index buffers, plan
   kernels); whatever it builds goes into `batch.attn_state`.
2. `forward(q, k, v, spec, batch)` per layer: writes the new tokens' K/V into the pool at
   `batch.out_cache_loc` (unless `batch.kv_pool` is None: encoders), then attends each
   request's new queries over its whole sequence (cached prefix + new tokens).

Shapes: q [T, num_heads * head_dim], k [T, num_kv_heads * head_dim], v [T, num_kv_heads *
v_head_dim]; returns [T, num_heads * v_head_dim] in q's dtype.

MLA (`spec.kv_latent`, asgl/layers/mla.py): decode batches always come through `forward` in
the weight-absorbed form over the latent cache. For extend and mixed batches a backend
whose `mla_expanded_prefill` is True splits the requests instead: those with at least
`mla_expand_min_tokens` new tokens get the expanded per-head K/V of their whole sequence
(`forward_expanded`, keys laid out by an `MLAKVIndex`), the others are attended row by row
in absorbed form (`forward_latent_rows`, `MLALatentRows`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from asgl.engine.contracts.forward_batch import ForwardBatch


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer asks of the backend; constant for the model's life."""

    layer_id: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    head_dim: int  # up to 256
    scaling: float  # softmax scale, usually head_dim ** -0.5
    v_head_dim: Optional[int] = None
    causal: bool = True  # False for encoders
    sliding_window: Optional[int] = None  # attend to at most this many most recent keys
    logit_cap: float = 0.0  # > 0: scores = cap * tanh(scores / cap) (Gemma 2)
    k_scale: Optional[float] = None  # FP8 KV cache: stored = k / k_scale
    v_scale: Optional[float] = None
    # MLA in absorbed form (asgl/layers/mla.py): one KV "head" is the token's latent
    # [kv_lora_rank | rope dims], stored once; V is its first v_head_dim columns. The pool
    # is a LatentKVPool and k is the latent; v is ignored on write.
    kv_latent: bool = False
    # ALiBi (BaiChuan 13B): per query head on this rank, scores += slope * (key_pos - q_pos)
    alibi_slopes: Optional[tuple[float, ...]] = None

    @property
    def v_dim(self) -> int:
        return self.v_head_dim or self.head_dim


class AttentionBackend(ABC):
    name: str = "base"

    def prepare(self, batch: "ForwardBatch") -> None:
        """Per-step planning; the default needs none."""

    # MLA extend batches: split between `forward_expanded` and `forward_latent_rows` (True)
    # or absorbed through `forward` (False); requests with >= mla_expand_min_tokens new
    # tokens are expanded
    mla_expanded_prefill: bool = False
    mla_expand_min_tokens: int = 64

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                batch: "ForwardBatch") -> torch.Tensor:
        ...

    def forward_expanded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         index: "MLAKVIndex", spec: AttentionSpec,
                         batch: "ForwardBatch") -> torch.Tensor:
        """The new queries q [Te, H, D] of the requests in `index` (at positions prefix ..
        seq-1 of each) attend causally over their whole sequences, whose keys k [S, H, D]
        and values v [S, H, Dv] are rows index.kv_start[i] .. + seq_len of request i;
        nothing is written to the pool. Returns [Te, H * Dv]."""
        raise NotImplementedError(f"{self.name} has no expanded MLA prefill")

    def forward_latent_rows(self, q: torch.Tensor, rows: "MLALatentRows", spec: AttentionSpec,
                            batch: "ForwardBatch") -> torch.Tensor:
        """Absorbed MLA for single query rows q [Ta, H, Dl + Dr]: row r attends over the
        latents req_to_token[rows.req_pool_indices[r], :rows.seq_lens[r]] (already in the
        pool). Returns [Ta, H * Dl]."""
        raise NotImplementedError(f"{self.name} has no latent-row MLA attention")


@dataclass
class MLAKVIndex:
    """The requests of an MLA extend step attended in expanded form, and where their keys
    are: each one's whole sequence (cached prefix + new tokens) gathered from the pool into
    rows kv_start[i] .. kv_start[i] + seq_lens[i] of one [S, ...] tensor. Built once per
    step (asgl/layers/mla.py), used by every layer; `cache` holds backend state for it."""

    slots: torch.Tensor  # [S] pool slots of the gathered rows, request by request
    kv_start: list[int]  # host: first gathered row of each request
    table: torch.Tensor  # [Be, max_seq] row of key j of request i (a req_to_token stand-in)
    rows: torch.Tensor  # [Be] arange: request i reads row i of `table`
    q_rows: Optional[torch.Tensor]  # [Te] the requests' token rows in the batch; None: all
    prefix_lens: torch.Tensor  # [Be] device, as ForwardBatch's, for these requests
    extend_lens: torch.Tensor
    extend_start_loc: torch.Tensor  # [Be] first row of each request in q [Te]
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    cache: dict = field(default_factory=dict)


@dataclass
class MLALatentRows:
    """Query rows of an MLA extend step attended in absorbed form, each as its own
    one-query "request": requests with few new tokens (decodes in a mixed batch, short
    extends over long prefixes), for which expanding every cached key costs more than
    attending over the latents. Built once per step (asgl/layers/mla.py)."""

    rows: torch.Tensor  # [Ta] token rows in the batch
    req_pool_indices: torch.Tensor  # [Ta] table row of each query's request
    seq_lens: torch.Tensor  # [Ta] keys each query sees: prefix + its index in the extend + 1
    seq_lens_cpu: list[int]
    splits: dict = field(default_factory=dict)  # backend state: KV splits per head count
