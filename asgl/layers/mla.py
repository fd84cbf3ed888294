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
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.nn.functional as F

from asgl.engine.contracts.attention import AttentionSpec, MLAKVIndex, MLALatentRows
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
        if (batch.mode.is_decode or batch.kv_pool is None
                or not getattr(backend, "mla_expanded_prefill", False)):
            return self._absorbed(q, latent, kv_b_weight, batch)
        spec, pool = self.spec, batch.kv_pool
        pool.set_kv(spec.layer_id, batch.out_cache_loc, latent, None, spec.k_scale)
        absorbed, expanded = mla_step_plan(batch, backend.mla_expand_min_tokens)
        if absorbed is None:
            return self._expanded(q, kv_b_weight, expanded, batch)
        if expanded is None:
            return self._latent_rows(q, kv_b_weight, absorbed, batch)
        out = q.new_empty(q.shape[0], self.num_heads * self.v_dim)
        out[absorbed.rows] = self._latent_rows(q[absorbed.rows], kv_b_weight, absorbed, batch)
        out[expanded.q_rows] = self._expanded(q[expanded.q_rows], kv_b_weight, expanded, batch)
        return out

    def extra_repr(self) -> str:
        return (f"layer={self.spec.layer_id}, heads={self.num_heads}, latent="
                f"{self.kv_lora_rank}+{self.rope}, qk_nope={self.nope}, v={self.v_dim}")

    def _weights(self, kv_b_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W_k [H, Dn, Dl] and W_v [H, Dv, Dl], views of kv_b_proj's weight."""
        w = kv_b_weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope], w[:, self.nope:]

    def _absorb_q(self, q: torch.Tensor, kv_b_weight: torch.Tensor) -> torch.Tensor:
        """[T, H, Dn + Dr] -> [T, H, Dl + Dr]: W_k^T q_nope next to q_pe."""
        w_k, _ = self._weights(kv_b_weight)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_k).transpose(0, 1)
        return torch.cat([q_lat, q_pe], dim=-1)

    def _unabsorb_o(self, o_lat: torch.Tensor, kv_b_weight: torch.Tensor) -> torch.Tensor:
        """Latent-space outputs [T, H * Dl] -> [T, H * Dv] through W_v."""
        _, w_v = self._weights(kv_b_weight)
        T = o_lat.shape[0]
        o = torch.bmm(o_lat.view(T, self.num_heads, self.kv_lora_rank).transpose(0, 1),
                      w_v.transpose(1, 2))  # [H, T, Dv]
        return o.transpose(0, 1).reshape(T, self.num_heads * self.v_dim)

    def _absorbed(self, q: torch.Tensor, latent: torch.Tensor, kv_b_weight: torch.Tensor,
                  batch: "ForwardBatch") -> torch.Tensor:
        """Through the backend's ordinary forward (which also writes the latents)."""
        T, Dl = q.shape[0], self.kv_lora_rank
        q_abs = self._absorb_q(q, kv_b_weight).reshape(T, -1)
        o_lat = batch.attn_backend.forward(q_abs, latent, latent[:, :Dl], self.spec, batch)
        return self._unabsorb_o(o_lat, kv_b_weight)

    def _latent_rows(self, q: torch.Tensor, kv_b_weight: torch.Tensor, rows: MLALatentRows,
                     batch: "ForwardBatch") -> torch.Tensor:
        q_abs = self._absorb_q(q, kv_b_weight)
        o_lat = batch.attn_backend.forward_latent_rows(q_abs, rows, self.spec, batch)
        return self._unabsorb_o(o_lat, kv_b_weight)

    def _expanded(self, q: torch.Tensor, kv_b_weight: torch.Tensor, index: MLAKVIndex,
                  batch: "ForwardBatch") -> torch.Tensor:
        spec = self.spec
        lat = batch.kv_pool.get_latent(spec.layer_id)[index.slots, 0].to(q.dtype)  # [S, Dl+Dr]
        if spec.k_scale is not None:
            lat = lat * spec.k_scale
        S, H, Dl = lat.shape[0], self.num_heads, self.kv_lora_rank
        kv = F.linear(lat[:, :Dl], kv_b_weight).view(S, H, self.nope + self.v_dim)
        k = torch.cat([kv[..., :self.nope], lat[:, None, Dl:].expand(S, H, self.rope)], dim=-1)
        v = kv[..., self.nope:]
        return batch.attn_backend.forward_expanded(q, k, v, index, self.expanded_spec, batch)


def mla_step_plan(batch: "ForwardBatch", expand_min_tokens: int
                  ) -> tuple[Optional[MLALatentRows], Optional[MLAKVIndex]]:
    """Split an extend step's requests: >= expand_min_tokens new tokens -> expanded (their
    keys gathered), the rest -> absorbed row by row. Built from host lengths once per step
    (the first MLA layer), copied without a device sync; None for an empty side."""
    key = ("mla_step_plan", expand_min_tokens)
    plan = batch.extra.get(key)
    if plan is None:
        plan = _build_plan(batch, expand_min_tokens)
        batch.extra[key] = plan
    return plan


def _build_plan(batch: "ForwardBatch", expand_min_tokens: int):
    ext = np.asarray(batch.extend_lens_cpu, dtype=np.int64)
    pre = np.asarray(batch.prefix_lens_cpu, dtype=np.int64)
    starts = np.cumsum(ext) - ext
    big = ext >= expand_min_tokens
    dev = batch.req_pool_indices.device
    pin = dev.type == "cuda"

    def up(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        return (t.pin_memory() if pin else t).to(dev, non_blocking=True)

    absorbed = expanded = None
    small = np.flatnonzero(~big)
    if small.size:
        n = ext[small]
        req = np.repeat(small, n)
        offs = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # index in its extend
        rows = starts[req] + offs
        seq = pre[req] + offs + 1
        rpi_dev = batch.req_pool_indices[up(req)]
        absorbed = MLALatentRows(rows=up(rows), req_pool_indices=rpi_dev, seq_lens=up(seq),
                                 seq_lens_cpu=seq.tolist())
    chosen = np.flatnonzero(big)
    if chosen.size:
        expanded = _kv_index(batch, chosen, ext, pre, starts, up,
                             all_rows=bool(chosen.size == len(ext)))
    return absorbed, expanded


def _kv_index(batch: "ForwardBatch", chosen: np.ndarray, ext: np.ndarray, pre: np.ndarray,
              starts: np.ndarray, up, all_rows: bool) -> MLAKVIndex:
    e, p = ext[chosen], pre[chosen]
    seqs = p + e
    kv_start = np.cumsum(seqs) - seqs
    req = np.repeat(chosen, seqs)
    col = np.arange(int(seqs.sum())) - np.repeat(kv_start, seqs)
    dev = batch.req_pool_indices.device
    slots = batch.req_to_token[batch.req_pool_indices[up(req)], up(col)]
    max_seq = int(seqs.max())
    table = up(kv_start)[:, None] + torch.arange(max_seq, device=dev)[None, :]
    q_rows = None
    if not all_rows:
        q_rows = up(np.repeat(starts[chosen], e) + np.arange(int(e.sum()))
                    - np.repeat(np.cumsum(e) - e, e))
    return MLAKVIndex(slots=slots, kv_start=kv_start.tolist(), table=table,
                      rows=torch.arange(len(chosen), device=dev), q_rows=q_rows,
                      prefix_lens=up(p), extend_lens=up(e), extend_start_loc=up(np.cumsum(e) - e),
                      prefix_lens_cpu=p.tolist(), extend_lens_cpu=e.tolist(),
                      seq_lens_cpu=seqs.tolist())
