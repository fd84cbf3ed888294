"""FlashInfer's MLA kernels on the latent pool (LatentKVPool, pages of one token).

Every batch runs in the weight-absorbed form (asgl/layers/mla.py) through FlashInfer's
paged MLA wrapper (`flashinfer.mla.BatchMLAPagedAttentionWrapper`): decode (one query
per request) and extends alike, causally aligned to the end of each sequence, so prefix
hits and prefill chunks read their cached latents straight from the pool. The pool's
[slots, 1, kv_lora_rank + rope] buffer is handed over as two views, the compressed KV
[slots, 1, kv_lora_rank] and the rotary keys [slots, 1, rope]: nothing is copied.

Per step (`prepare`, once for every layer): the host builds the indptr arrays from host
lengths, the page indices are gathered on the device from req_to_token (no host sync),
and the wrapper is planned once (every MLA layer shares heads, dims and softmax scale).

CUDA graphs: decode batches only (`graph_extend` False: the runner captures no extend
graphs). One graph-mode wrapper per captured batch size over shared static index buffers;
`prepare_cuda_graph` plans it for the batch padded to that size (a padding row attends to
slot 0 alone) before capture and before every replay.

`ASGL_FLASHINFER_MLA_BACKEND` picks FlashInfer's MLA implementation (default fa2, the one
JIT module; "auto" lets FlashInfer choose, e.g. fa3 on Hopper).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch

from asgl.engine.contracts.attention import AttentionBackend, AttentionSpec
from asgl.kernels.attention.flashinfer_backend import (_host_indptr, _kv_indices,
                                                       reuse_prebuilt_modules)

if TYPE_CHECKING:
    from asgl.engine.contracts.forward_batch import ForwardBatch

_WORKSPACE_BYTES = 128 << 20


class FlashInferMLABackend(AttentionBackend):
    name = "flashinfer"
    mla_expanded_prefill = False  # absorbed everywhere: one paged kernel, causal extends
    supports_cuda_graph = True
    graph_extend = False

    def __init__(self, *, device: torch.device, num_heads: int, kv_lora_rank: int,
                 rope_dim: int, sm_scale: float, dtype: torch.dtype,
                 kv_dtype: Optional[torch.dtype] = None):
        reuse_prebuilt_modules()
        from flashinfer.mla import BatchMLAPagedAttentionWrapper

        if dtype not in (torch.float16, torch.bfloat16):
            raise NotImplementedError(f"flashinfer MLA needs fp16/bf16, not {dtype}")
        if (kv_dtype or dtype) != dtype:
            raise NotImplementedError("flashinfer MLA: KV cache dtype must equal the model's")
        self.device, self.dtype = device, dtype
        self.num_heads, self.kv_lora_rank, self.rope_dim = num_heads, kv_lora_rank, rope_dim
        self.sm_scale = sm_scale
        self.workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._wrapper_cls = BatchMLAPagedAttentionWrapper
        self._kernel = os.environ.get("ASGL_FLASHINFER_MLA_BACKEND", "fa2")
        self.wrapper = BatchMLAPagedAttentionWrapper(self.workspace, backend=self._kernel)
        self._graph_wrappers: dict[int, object] = {}

    def check_spec(self, spec: AttentionSpec) -> None:
        """Raise NotImplementedError for a layer the one plan cannot run."""
        if not spec.kv_latent:
            raise NotImplementedError("flashinfer MLA backend: MLA (latent) layers only")
        if (spec.num_heads, spec.v_dim, spec.head_dim - spec.v_dim, spec.scaling) != \
                (self.num_heads, self.kv_lora_rank, self.rope_dim, self.sm_scale):
            raise NotImplementedError("flashinfer MLA backend: every layer must share heads, "
                                      "latent dims and softmax scale")
        if spec.k_scale is not None:
            raise NotImplementedError("flashinfer MLA backend: no scaled (fp8) latent cache")

    def prepare(self, batch: "ForwardBatch") -> None:
        kv_indptr = _host_indptr(batch.seq_lens_cpu)
        indices = _kv_indices(batch, int(kv_indptr[-1]))
        self._plan(self.wrapper, batch.extend_lens_cpu, batch.seq_lens_cpu, kv_indptr, indices)
        batch.attn_state = self.wrapper

    def _plan(self, wrapper, qo_lens: list[int], kv_lens: list[int], kv_indptr: torch.Tensor,
              indices: torch.Tensor) -> None:
        wrapper.plan(qo_indptr=_host_indptr(qo_lens), kv_indptr=kv_indptr, kv_indices=indices,
                     kv_len_arr=torch.tensor(kv_lens, dtype=torch.int32).pin_memory(),
                     num_heads=self.num_heads, head_dim_ckv=self.kv_lora_rank,
                     head_dim_kpe=self.rope_dim, page_size=1, causal=True,
                     sm_scale=self.sm_scale, q_data_type=self.dtype, kv_data_type=self.dtype)

    # ------------------------------------------------------------------ CUDA graphs
    def init_cuda_graph_state(self, shapes: list[tuple[int, int]], max_kv_tokens: int) -> None:
        if any(bs != tokens for bs, tokens in shapes):
            raise NotImplementedError("flashinfer MLA backend: decode graphs only")
        max_bs, dev = max(bs for bs, _ in shapes), self.device
        self._g_qo_indptr = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self._g_kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=dev)
        self._g_indices = torch.zeros(max_kv_tokens + max_bs, dtype=torch.int32, device=dev)
        self._g_kv_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self._g_pad = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self._graph_wrappers.clear()

    def prepare_cuda_graph(self, batch: "ForwardBatch", padded_bs: int,
                           padded_tokens: Optional[int] = None) -> None:
        if padded_tokens not in (None, padded_bs) or not batch.mode.is_decode:
            raise NotImplementedError("flashinfer MLA backend: decode graphs only")
        bs = batch.batch_size
        wrapper = self._graph_wrappers.get(padded_bs)
        if wrapper is None:
            wrapper = self._wrapper_cls(
                self.workspace, use_cuda_graph=True, qo_indptr=self._g_qo_indptr[:padded_bs + 1],
                kv_indptr=self._g_kv_indptr[:padded_bs + 1], kv_indices=self._g_indices,
                kv_len_arr=self._g_kv_lens[:padded_bs], backend=self._kernel)
            self._graph_wrappers[padded_bs] = wrapper
        kv_lens = list(batch.seq_lens_cpu) + [1] * (padded_bs - bs)  # padding: slot 0
        kv_indptr = _host_indptr(kv_lens)
        real = _kv_indices(batch, int(kv_indptr[bs]))
        indices = torch.cat([real, self._g_pad[:padded_bs - bs]]) if padded_bs > bs else real
        self._plan(wrapper, [1] * padded_bs, kv_lens, kv_indptr, indices)
        batch.attn_state = wrapper

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                batch: "ForwardBatch") -> torch.Tensor:
        pool = batch.kv_pool
        T, Dl = q.shape[0], self.kv_lora_rank
        pool.set_kv(spec.layer_id, batch.out_cache_loc, k.view(T, 1, spec.head_dim))
        buf = pool.get_latent(spec.layer_id)  # [slots, 1, Dl + rope]: page size 1
        q = q.view(T, spec.num_heads, spec.head_dim)
        out = batch.attn_state.run(q[..., :Dl].contiguous(), q[..., Dl:].contiguous(),
                                   buf[..., :Dl], buf[..., Dl:])
        return out.reshape(T, spec.num_heads * Dl)
