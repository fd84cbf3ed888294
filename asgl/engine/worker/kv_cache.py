"""KVPool: per-layer K and V buffers on the device, addressed by KV slot.

Owner: the worker thread (the model runner creates it; the attention backends read and
write it through `ForwardBatch.kv_pool`). Which slot belongs to whom is decided on the
scheduler side (`asgl/engine/scheduler/memory.py`); this module only holds the tensors.
"""

from __future__ import annotations

import torch

from asgl.layers.fused import use_fused


class KVPool:
    """K and V for `num_slots` tokens in every layer. Index 0 is the padding slot."""

    def __init__(self, num_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, v_head_dim: int | None = None):
        self.num_tokens = num_tokens
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape_k = (num_tokens + 1, num_kv_heads, head_dim)
        shape_v = (num_tokens + 1, num_kv_heads, self.v_head_dim)
        self.k_buffers = [torch.zeros(shape_k, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape_v, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        v_head_dim: int | None = None) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return num_layers * num_kv_heads * (head_dim + (v_head_dim or head_dim)) * elem

    def get_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffers[layer_id], self.v_buffers[layer_id]

    def set_kv(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_scale: float | None = None, v_scale: float | None = None) -> None:
        """Write K/V of shape [T, kv_heads, head_dim] for T tokens into `slots`."""
        k_buf, v_buf = self.k_buffers[layer_id], self.v_buffers[layer_id]
        if k_scale is None and v_scale is None and use_fused(k):
            from asgl.kernels.triton.kv_store import can_store, store_kv
            if can_store(k, v, k_buf, v_buf):  # one launch instead of two index_puts
                store_kv(k, v, k_buf, v_buf, slots)
                return
        if k_scale is not None:
            k = k / k_scale
        if v_scale is not None:
            v = v / v_scale
        if self.dtype.is_floating_point and self.dtype.itemsize == 1:
            # float8 e4m3fn has no infinity: an overflow would become NaN, so saturate.
            limit = torch.finfo(self.dtype).max
            k, v = k.clamp(-limit, limit), v.clamp(-limit, limit)
        k_buf[slots] = k.to(self.dtype)
        v_buf[slots] = v.to(self.dtype)
