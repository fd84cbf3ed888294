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
    # ALiBi (BaiChuan 13B): per query head on this rank, scores += slope * (key_pos - q_pos)
    alibi_slopes: Optional[tuple[float, ...]] = None

    @property
    def v_dim(self) -> int:
        return self.v_head_dim or self.head_dim


class AttentionBackend(ABC):
    name: str = "base"

    def prepare(self, batch: "ForwardBatch") -> None:
        """Per-step planning; the default needs none."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                batch: "ForwardBatch") -> torch.Tensor:
        ...
