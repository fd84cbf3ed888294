"""Multi-head latent attention (MLA, DeepSeek-V2 §2.1) over a latent KV cache.

The model's projections give, per token, queries q [H, Dn + Dr] (no-position part and
rotated part) and the latent [Dl + Dr]: the normalized KV latent c and the rotated shared
key k_pe. The pool (LatentKVPool) stores only the latent. With kv_b_proj's weight split
per head into W_k [Dn, Dl] and W_v [Dv, Dl], a head's key and value for a token are
k = [W_k c, k_pe] and v = W_v c, so

    q . k = [W_k^T q_nope, q_pe] . [c, k_pe]    and    sum_j p_j v_j = W_v sum_j p_j c_j.

Two ways to compute the same attention:

- absorbed (every decode batch; extend batches on backends without expanded prefill):
  q_nope is multiplied into the latent space once per token, then it is MQA with one KV
  head of Dl + Dr dims over the cached latents, V being their first Dl columns; W_v is
  applied to the Dl-dim output. Reads 576 values per cached token (DeepSeek dims) for all
  heads at once: what makes decode cheap.
- expanded (extend batches): every request's latents (prefix + new) are gathered from
  the pool and expanded to per-head K [Dn + Dr] and V [Dv], then ordinary causal
  attention: fewer FLOPs per query-key pair (192 + 128 vs 576 + 512) when many queries
  share the keys.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from asgl.engine.contracts.attention import AttentionSpec, MLAKVIndex
from asgl.layers.attention import Attention

if TYPE_CHECKING:
    from asgl.engine.contracts.forward_batch import ForwardBatch


class LatentAttention(Attention):
    """An Attention layer (so the engine finds its spec like any other) whose spec is
    the absorbed form's: MQA over the latent, V = the latent's first kv_lora_rank columns."""

    def __init__(self, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, kv_lora_rank: int, scaling: float, layer_id: int):
        """`num_heads`: this rank's heads."""
        super().__init__(num_heads, kv_lora_rank + qk_rope_head_dim, scaling, 1, layer_id,
                         v_head_dim=kv_lora_rank)
        self.spec = dataclasses.replace(self.spec, kv_latent=True)
        self.num_heads, self.kv_lora_rank = num_heads, kv_lora_rank
        self.nope, self.rope, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        # expanded: ordinary multi-head attention
        self.expanded_spec = AttentionSpec(layer_id=layer_id, num_heads=num_heads,
                                           num_kv_heads=num_heads,
                                           head_dim=qk_nope_head_dim + qk_rope_head_dim,
                                           scaling=scaling, v_head_dim=v_head_dim)

    def forward(self, q: torch.Tensor, latent: torch.Tensor,  # type: ignore[override]
                kv_b_weight: torch.Tensor, batch: "ForwardBatch") -> torch.Tensor:
        """q [T, H, Dn + Dr] and latent [T, Dl + Dr], both rotated; kv_b_weight
        [H * (Dn + Dv), Dl] (kv_b_proj, this rank's heads) -> [T, H * Dv]."""
        backend = batch.attn_backend
        if (not batch.mode.is_decode and batch.kv_pool is not None
                and getattr(backend, "mla_expanded_prefill", False)):
            return self._expanded(q, latent, kv_b_weight, batch)
        return self._absorbed(q, latent, kv_b_weight, batch)

    def extra_repr(self) -> str:
        return (f"layer={self.spec.layer_id}, heads={self.num_heads}, latent="
                f"{self.kv_lora_rank}+{self.rope}, qk_nope={self.nope}, v={self.v_dim}")

    def _weights(self, kv_b_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W_k [H, Dn, Dl] and W_v [H, Dv, Dl], views of kv_b_proj's weight."""
        w = kv_b_weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope], w[:, self.nope:]

    def _absorbed(self, q: torch.Tensor, latent: torch.Tensor, kv_b_weight: torch.Tensor,
                  batch: "ForwardBatch") -> torch.Tensor:
        T, H, Dl = q.shape[0], self.num_heads, self.kv_lora_rank
        w_k, w_v = self._weights(kv_b_weight)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_k).transpose(0, 1)  # [T, H, Dl]
        q_abs = torch.cat([q_lat, q_pe], dim=-1).reshape(T, H * (Dl + self.rope))
        o_lat = batch.attn_backend.forward(q_abs, latent, latent[:, :Dl], self.spec, batch)
        o = torch.bmm(o_lat.view(T, H, Dl).transpose(0, 1), w_v.transpose(1, 2))  # [H, T, Dv]
        return o.transpose(0, 1).reshape(T, H * self.v_dim)

    def _expanded(self, q: torch.Tensor, latent: torch.Tensor, kv_b_weight: torch.Tensor,
                  batch: "ForwardBatch") -> torch.Tensor:
        spec, pool = self.spec, batch.kv_pool
        pool.set_kv(spec.layer_id, batch.out_cache_loc, latent, None, spec.k_scale)
        index = mla_kv_index(batch)
        lat = pool.get_latent(spec.layer_id)[index.slots, 0].to(q.dtype)  # [S, Dl + Dr]
        if spec.k_scale is not None:
            lat = lat * spec.k_scale
        S, H, Dl = lat.shape[0], self.num_heads, self.kv_lora_rank
        kv = F.linear(lat[:, :Dl], kv_b_weight).view(S, H, self.nope + self.v_dim)
        k = torch.cat([kv[..., :self.nope], lat[:, None, Dl:].expand(S, H, self.rope)], dim=-1)
        v = kv[..., self.nope:]
        return batch.attn_backend.forward_expanded(q, k, v, index, self.expanded_spec, batch)


def mla_kv_index(batch: "ForwardBatch") -> MLAKVIndex:
    """Where every request's whole sequence lies in the pool, and where it will lie once
    gathered: built from host lengths once per step (the first MLA layer), no device sync."""
    index = batch.extra.get("mla_kv_index")
    if index is not None:
        return index
    seqs = np.asarray(batch.seq_lens_cpu, dtype=np.int64)
    starts = np.cumsum(seqs) - seqs
    req = np.repeat(np.arange(len(seqs)), seqs)
    col = np.arange(int(seqs.sum())) - np.repeat(starts, seqs)
    dev = batch.req_pool_indices.device
    pin = dev.type == "cuda"

    def up(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return (t.pin_memory() if pin else t).to(dev, non_blocking=True)

    req_t, col_t, start_t = up(req), up(col), up(starts)
    slots = batch.req_to_token[batch.req_pool_indices[req_t], col_t]
    max_seq = int(seqs.max()) if len(seqs) else 0
    table = start_t[:, None] + torch.arange(max_seq, device=dev)[None, :]
    index = MLAKVIndex(slots=slots, kv_start=starts.tolist(), table=table,
                       rows=torch.arange(len(seqs), device=dev))
    batch.extra["mla_kv_index"] = index
    return index
