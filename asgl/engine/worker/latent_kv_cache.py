"""LatentKVPool: the KV pool of multi-head latent attention (MLA: DeepSeek V2/V3, MiniCPM 3).

An MLA layer caches, per token, its compressed latent: the normalized KV latent c
(kv_lora_rank values) and the rotated shared key k_pe (qk_rope_head_dim values), one
buffer [slots, 1, kv_lora_rank + rope] per layer. The per-head K and V are never stored:
decode attends in the weight-absorbed form with the latent as its one KV head and V as
the latent's first kv_lora_rank columns (`get_kv` returns that view, no copy); prefill
expands K/V from gathered latents (asgl/layers/mla.py). DeepSeek-V2-Lite: 576 values per
token per layer instead of 2 x 16 heads x 192 = 6,144 for the expanded K/V.

Slots mean the same as in KVPool (index 0 is the padding slot), so the scheduler, radix
cache, chunked prefill and request table deal in slots exactly as for any other model.
Owner: the worker thread, like KVPool.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from asgl.engine.worker.kv_cache import KVPool


class LatentKVPool:
    """One latent row per token per layer; the same slot API as KVPool."""

    def __init__(self, num_tokens: int, num_layers: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.num_tokens, self.num_layers = num_tokens, num_layers
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        self.num_kv_heads = 1
        self.head_dim = kv_lora_rank + rope_dim
        self.v_head_dim = kv_lora_rank
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_tokens + 1, 1, self.head_dim)
        self.buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, kv_lora_rank: int, rope_dim: int,
                        dtype: torch.dtype) -> int:
        return num_layers * (kv_lora_rank + rope_dim) * torch.empty((), dtype=dtype).element_size()

    def get_latent(self, layer_id: int) -> torch.Tensor:
        """[slots, 1, kv_lora_rank + rope]."""
        return self.buffers[layer_id]

    def get_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) for absorbed attention: the latent and a view of its first columns."""
        buf = self.buffers[layer_id]
        return buf, buf[..., :self.kv_lora_rank]

    def set_kv(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor,
               v: Optional[torch.Tensor] = None, k_scale: Optional[float] = None,
               v_scale: Optional[float] = None) -> None:
        """Write latents k [T, 1, kv_lora_rank + rope] into `slots`; `v` (the latent's first
        columns) is not stored twice."""
        if k_scale is not None:
            k = k / k_scale
        if self.dtype.is_floating_point and self.dtype.itemsize == 1:
            limit = torch.finfo(self.dtype).max  # float8 e4m3fn: saturate, never NaN
            k = k.clamp(-limit, limit)
        self.buffers[layer_id][slots] = k.reshape(-1, 1, self.head_dim).to(self.dtype)


def kv_latent_dims(model: Any) -> Optional[tuple[int, int]]:
    """(kv_lora_rank, rope dims) of an MLA model (its `kv_latent_dims`), else None."""
    return getattr(model, "kv_latent_dims", None)


def kv_bytes_per_token(model: Any, dtype: torch.dtype) -> int:
    """KV bytes one token takes over all layers, for the model's pool layout."""
    latent = kv_latent_dims(model)
    if latent is not None:
        return LatentKVPool.bytes_per_token(model.num_layers, *latent, dtype)
    return KVPool.bytes_per_token(model.num_layers, model.num_kv_heads, model.head_dim, dtype)


def create_kv_pool(model: Any, num_tokens: int, dtype: torch.dtype,
                   device: torch.device) -> KVPool | LatentKVPool:
    latent = kv_latent_dims(model)
    if latent is not None:
        return LatentKVPool(num_tokens, model.num_layers, *latent, dtype, device)
    return KVPool(num_tokens, model.num_layers, model.num_kv_heads, model.head_dim, dtype,
                  device)


def describe_layout(model: Any, dtype: torch.dtype) -> str:
    """The start-up line's words for the layout: what one token stores per layer."""
    latent = kv_latent_dims(model)
    if latent is not None:
        return (f"MLA latent: {latent[0]} + {latent[1]} values per token per layer, "
                f"{model.num_layers} layers, {str(dtype).replace('torch.', '')}")
    return (f"K/V: 2 x {model.num_kv_heads} heads x {model.head_dim} per token per layer, "
            f"{model.num_layers} layers, {str(dtype).replace('torch.', '')}")
