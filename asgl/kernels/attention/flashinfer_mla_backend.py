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
CUDA graphs are not wired for this backend yet (`supports_cuda_graph` False).
"""

from __future__ import annotations

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
    supports_cuda_graph = False

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
        self.wrapper = BatchMLAPagedAttentionWrapper(self.workspace)

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
        kv_lens = torch.tensor(batch.seq_lens_cpu, dtype=torch.int32).pin_memory()
        self.wrapper.plan(qo_indptr=_host_indptr(batch.extend_lens_cpu), kv_indptr=kv_indptr,
                          kv_indices=indices, kv_len_arr=kv_lens, num_heads=self.num_heads,
                          head_dim_ckv=self.kv_lora_rank, head_dim_kpe=self.rope_dim,
                          page_size=1, causal=True, sm_scale=self.sm_scale,
                          q_data_type=self.dtype, kv_data_type=self.dtype)
        batch.attn_state = self.wrapper

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
