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
the weight-absorbed form over the latent cache. For extend batches a backend whose
`mla_expanded_prefill` is True is instead handed the expanded per-head K/V of every
request's whole sequence (`forward_expanded`, keys laid out by an `MLAKVIndex`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
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

    @property
    def v_dim(self) -> int:
        return self.v_head_dim or self.head_dim


class AttentionBackend(ABC):
    name: str = "base"

    def prepare(self, batch: "ForwardBatch") -> None:
        """Per-step planning; the default needs none."""

    # MLA extend batches: expanded K/V through `forward_expanded` (True) or absorbed (False)
    mla_expanded_prefill: bool = False

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                batch: "ForwardBatch") -> torch.Tensor:
        ...

    def forward_expanded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         index: "MLAKVIndex", spec: AttentionSpec,
                         batch: "ForwardBatch") -> torch.Tensor:
        """Each request's new queries q [T, H, D] (at positions prefix .. seq-1) attend
        causally over its whole sequence, whose keys k [S, H, D] / values v [S, H, Dv] are
        rows index.kv_start[i] .. + seq_lens[i]; nothing is written to the pool. Returns
        [T, H * Dv]."""
        raise NotImplementedError(f"{self.name} has no expanded MLA prefill")


@dataclass
class MLAKVIndex:
    """Where an MLA extend step's keys are: every request's whole sequence (cached prefix +
    new tokens) gathered from the pool into rows kv_start[i] .. kv_start[i] + seq_lens[i]
    of one [S, ...] tensor. Built once per step (asgl/layers/mla.py), used by every layer."""

    slots: torch.Tensor  # [S] pool slots of the gathered rows, request by request
    kv_start: list[int]  # host: first row of each request
    table: torch.Tensor  # [B, max_seq] row of key j of request i (a req_to_token stand-in)
    rows: torch.Tensor  # [B] arange: request i reads row i of `table`
