"""The attention layer models hold: a fixed `AttentionSpec`, and a call into the step's
backend (torch, triton, flashinfer), which also writes the new K/V into the pool."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from asgl.engine.contracts.attention import AttentionSpec

if TYPE_CHECKING:
    from asgl.engine.contracts.forward_batch import ForwardBatch


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scaling: float, num_kv_heads: int,
                 layer_id: int, *, v_head_dim: Optional[int] = None, causal: bool = True,
                 sliding_window: Optional[int] = None, logit_cap: float = 0.0,
                 k_scale: Optional[float] = None, v_scale: Optional[float] = None):
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.spec = AttentionSpec(layer_id=layer_id, num_heads=num_heads,
                                  num_kv_heads=num_kv_heads, head_dim=head_dim, scaling=scaling,
                                  v_head_dim=v_head_dim, causal=causal,
                                  sliding_window=sliding_window, logit_cap=logit_cap,
                                  k_scale=k_scale, v_scale=v_scale)

    def set_kv_scales(self, k_scale: Optional[float], v_scale: Optional[float]) -> None:
        """FP8 KV-cache scales, known only once the checkpoint is read."""
        self.spec = dataclasses.replace(self.spec, k_scale=k_scale, v_scale=v_scale)

    def set_alibi_slopes(self, slopes: list[float]) -> None:
        """ALiBi position biases instead of rotary (one slope per head on this rank)."""
        if len(slopes) != self.spec.num_heads:
            raise ValueError(f"{len(slopes)} ALiBi slopes for {self.spec.num_heads} heads")
        self.spec = dataclasses.replace(self.spec, alibi_slopes=tuple(float(s) for s in slopes))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: "ForwardBatch") -> torch.Tensor:
        """q [T, heads * head_dim], k/v [T, kv_heads * dim] -> [T, heads * v_head_dim]."""
        return batch.attn_backend.forward(q, k, v, self.spec, batch)

    def extra_repr(self) -> str:
        s = self.spec
        return f"layer={s.layer_id}, heads={s.num_heads}/{s.num_kv_heads}, head_dim={s.head_dim}"
