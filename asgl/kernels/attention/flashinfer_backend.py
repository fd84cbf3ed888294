"""FlashInfer attention on the token KV pool (pages of one token).

One kernel family serves every step: FlashInfer's batch prefill over a paged KV cache
(`BatchPrefillWithPagedKVCacheWrapper`, FA2 kernels). Each layer first writes the new
tokens' K/V into the pool, then every request attends its new queries over its whole
sequence (cached prefix + new tokens) through page indices, causally aligned to the end
of the sequence. Decode is the same kernel with one query per request (the tensor-core path
FlashInfer itself uses for grouped-query decode), so only one JIT module is ever built
(~1-2 min on first use; reused from ~/.cache/flashinfer afterwards).

FP8 KV cache (`--kv-cache-dtype fp8_*`): plans take the FP8 KV dtype with 16-bit queries;
the pool stores k / k_scale and `run` gets the layer's K/V scales (a checkpoint's, or none
for 1.0).

Per step (`prepare`, once, reused by every layer): the host builds the two indptr arrays
from the batch's host lengths; the page indices are gathered on the device from
`req_to_token` (no host sync); `plan` runs on the host.

Layers that differ in what a plan fixes (sliding window, logit soft-cap, softmax scale:
Gemma 2/3 alternate windowed and global layers) get one wrapper each, a "variant"; every
variant is planned per step from the same index arrays. `check_spec` registers a model's
variants when the backend is chosen, so the per-step planning and the CUDA-graph wrappers
cover all of them before any layer runs. Our `sliding_window` w admits the query and the
w - 1 keys before it, FlashInfer's `window_left` counts the keys before: w - 1.

CUDA graphs (asgl/engine/cuda_graph_runner.py): `init_cuda_graph_state` allocates static
index buffers and one graph-mode wrapper per captured (requests, tokens) shape;
`prepare_cuda_graph` plans that wrapper for a batch padded to the captured shape (padding
rows attend to slot 0 only) before capture and before every replay. A graph-mode plan
fixes the batch size and the most query rows, and accepts any split of the rows over the
requests (FlashInfer sizes its tiles for the worst split), so one extend graph serves
every mix of prefill chunks and decode rows of its token count.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from asgl.engine.contracts.attention import AttentionBackend, AttentionSpec
from asgl.kernels.attention.variants import flashinfer_gap

if TYPE_CHECKING:
    from asgl.engine.contracts.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)

_WORKSPACE_BYTES = 256 << 20  # FlashInfer's split-KV scratch, shared by all wrappers
_KERNEL_BACKEND = "fa2"  # one JIT variant for prefill and decode; sm90 FA3 adds ~95 s of JIT


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    supports_cuda_graph = True

    def __init__(self, *, device: torch.device, num_heads: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, kv_dtype: Optional[torch.dtype] = None):
        reuse_prebuilt_modules()
        from flashinfer import BatchPrefillWithPagedKVCacheWrapper

        if dtype not in (torch.float16, torch.bfloat16):
            raise NotImplementedError(f"flashinfer attention needs fp16/bf16, not {dtype}")
        kv_dtype = kv_dtype or dtype
        if kv_dtype != dtype and kv_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise NotImplementedError("flashinfer backend: the KV cache is the model's dtype "
                                      f"or FP8, not {kv_dtype}")
        self._wrapper_cls = BatchPrefillWithPagedKVCacheWrapper
        self.device = device
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dtype, self.kv_dtype = dtype, kv_dtype
        self.sm_scale = head_dim ** -0.5
        self.workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # variant (window_left, logit cap, sm_scale) -> its eager wrapper
        self._variants: dict[tuple[int, float, float], object] = {}
        self._graph_wrappers: dict[tuple[int, int, tuple], object] = {}
        self._plan_args: Optional[tuple] = None  # this step's eager plan inputs
        self._ones = torch.ones(1, dtype=torch.int32)  # grown on demand: last page lens

    # ------------------------------------------------------------------ checks
    def check_spec(self, spec: AttentionSpec) -> None:
        """Raise NotImplementedError for a layer this backend's one variant cannot run."""
        if (spec.num_heads, spec.num_kv_heads, spec.head_dim) != \
                (self.num_heads, self.num_kv_heads, self.head_dim):
            raise NotImplementedError("flashinfer backend: every layer must share head shapes")
        if spec.v_dim != spec.head_dim or not spec.causal:
            raise NotImplementedError("flashinfer backend: causal attention, v_dim == head_dim")
        gap = flashinfer_gap(spec)
        if gap is not None:
            raise NotImplementedError(f"flashinfer backend: {gap}")
        self._add_variant(_variant(spec))

    def _add_variant(self, variant: tuple[int, float, float]) -> None:
        if variant not in self._variants:
            self._variants[variant] = self._wrapper_cls(self.workspace, "NHD",
                                                        backend=_KERNEL_BACKEND)

    # ------------------------------------------------------------------ per step
    def prepare(self, batch: "ForwardBatch") -> None:
        qo_indptr = _host_indptr(batch.extend_lens_cpu)
        kv_indptr = _host_indptr(batch.seq_lens_cpu)
        indices = _kv_indices(batch, int(kv_indptr[-1]))
        self._plan_args = (qo_indptr, kv_indptr, indices, batch.batch_size)
        for variant, wrapper in self._variants.items():
            self._plan(wrapper, variant, *self._plan_args)
        batch.attn_state = _Plans(self._variants)

    def _plan(self, wrapper, variant: tuple[int, float, float], qo_indptr: torch.Tensor,
              kv_indptr: torch.Tensor, indices: torch.Tensor, bs: int) -> None:
        if self._ones.numel() < bs:
            self._ones = torch.ones(max(bs, 2 * self._ones.numel()), dtype=torch.int32).pin_memory()
        window_left, cap, scale = variant
        wrapper.plan(qo_indptr, kv_indptr, indices, self._ones[:bs], self.num_heads,
                     self.num_kv_heads, self.head_dim, 1, causal=True, sm_scale=scale,
                     window_left=window_left, logits_soft_cap=cap or None,
                     q_data_type=self.dtype, kv_data_type=self.kv_dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                batch: "ForwardBatch") -> torch.Tensor:
        pool = batch.kv_pool
        if pool is None:
            raise NotImplementedError("flashinfer backend: encoder (no KV pool) batches")
        T = q.shape[0]
        pool.set_kv(spec.layer_id, batch.out_cache_loc,
                    k.view(T, spec.num_kv_heads, spec.head_dim),
                    v.view(T, spec.num_kv_heads, spec.head_dim), spec.k_scale, spec.v_scale)
        k_buf, v_buf = pool.get_kv(spec.layer_id)
        q = q.view(T, spec.num_heads, spec.head_dim)
        wrapper = batch.attn_state.get(_variant(spec))
        if wrapper is None:  # a layer check_spec never saw: plan it now (eager steps only)
            if self._plan_args is None or torch.cuda.is_current_stream_capturing():
                raise RuntimeError("flashinfer backend: layer variant not registered through "
                                   "check_spec before CUDA-graph capture")
            self.check_spec(spec)
            wrapper = self._variants[_variant(spec)]
            self._plan(wrapper, _variant(spec), *self._plan_args)
            batch.attn_state[_variant(spec)] = wrapper
        # [slots, kv_heads, dim] is NHD paged layout with page size 1: add the page axis
        # FP8 KV (stored = k / k_scale): the kernel folds k_scale into the softmax scale and
        # multiplies the output by v_scale; plain Python floats, so graphs capture them
        scales = {} if spec.k_scale is None and spec.v_scale is None else \
            {"k_scale": spec.k_scale, "v_scale": spec.v_scale}
        out = wrapper.run(q, (k_buf.unsqueeze(1), v_buf.unsqueeze(1)), **scales)
        return out.view(T, spec.num_heads * spec.head_dim)

    # ------------------------------------------------------------------ CUDA graphs
    def init_cuda_graph_state(self, shapes: list[tuple[int, int]], max_kv_tokens: int) -> None:
        """Static buffers that the graph-mode wrappers of the (requests, tokens) `shapes`
        read by address at replay.

        Graph-mode plans always split the KV, so the largest graph's partial outputs must
        fit in the float workspace: it grows here when they would not."""
        dev = self.device
        max_bs = max(bs for bs, _ in shapes)
        max_tokens = max(tokens for _, tokens in shapes)
        self._g_qo_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=dev)
        self._g_kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=dev)
        self._g_indices = torch.zeros(max_kv_tokens + max_bs, dtype=torch.int32, device=dev)
        self._g_last_page = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self._g_pad = torch.zeros(max_bs + max_tokens, dtype=torch.int32, device=dev)
        need = max(self._split_kv_bytes(bs, tokens) for bs, tokens in shapes)
        if need > self.workspace.numel():
            self.workspace = torch.empty(need, dtype=torch.uint8, device=dev)
            variants, self._variants = list(self._variants), {}
            for variant in variants:
                self._add_variant(variant)
        self._graph_wrappers.clear()

    def _split_kv_bytes(self, bs: int, rows: int) -> int:
        """An upper bound of the float workspace a graph-mode plan of `bs` requests and
        `rows` query rows takes: FlashInfer pads its work items to ceil(rows x group /
        tile) + bs - 1 (at least 2 per SM and KV head), each with a tile of partial outputs
        and log-sum-exps in float32; the tile is 16 rows for decode, up to 128."""
        group = self.num_heads // self.num_kv_heads
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        packed = (rows - bs + 1) * group
        tile = 128 if packed > 64 else (64 if packed > 16 else 16)
        items = max(-(-rows * group // tile) + bs - 1, 2 * sms // self.num_kv_heads)
        per_item = tile * self.num_heads * (self.head_dim + 1) * 4
        return items * per_item * 5 // 4 + (16 << 20)  # alignment and the plan's int arrays

    def _graph_wrapper(self, bs: int, tokens: int, variant: tuple[int, float, float]):
        """Wrappers of one shape share the index buffers: every variant plans the same
        indices."""
        w = self._graph_wrappers.get((bs, tokens, variant))
        if w is None:
            w = self._wrapper_cls(
                self.workspace, "NHD", use_cuda_graph=True,
                qo_indptr_buf=self._g_qo_indptr[:bs + 1],
                paged_kv_indptr_buf=self._g_kv_indptr[:bs + 1],
                paged_kv_indices_buf=self._g_indices,
                paged_kv_last_page_len_buf=self._g_last_page[:bs], backend=_KERNEL_BACKEND)
            self._graph_wrappers[(bs, tokens, variant)] = w
        return w

    def prepare_cuda_graph(self, batch: "ForwardBatch", padded_bs: int,
                           padded_tokens: Optional[int] = None) -> None:
        """Plan the (padded_bs, padded_tokens) graph wrapper for `batch`; the padding
        requests' keys are slot 0 (`pad_extend_lengths` says how many)."""
        from asgl.kernels.attention.padding import pad_extend_lengths

        bs = batch.batch_size
        padded_tokens = padded_bs if padded_tokens is None else padded_tokens
        qo_lens, kv_lens = pad_extend_lengths(batch.extend_lens_cpu, batch.seq_lens_cpu,
                                              padded_bs, padded_tokens)
        kv_indptr = _host_indptr(kv_lens)
        real = _kv_indices(batch, int(kv_indptr[bs]))
        pad_keys = int(kv_indptr[-1]) - int(kv_indptr[bs])
        indices = torch.cat([real, self._g_pad[:pad_keys]]) if pad_keys else real
        qo_indptr = _host_indptr(qo_lens)
        self._plan_args = None  # graph steps never plan inside forward
        state = _Plans()
        for variant in self._variants:
            wrapper = self._graph_wrapper(padded_bs, padded_tokens, variant)
            self._plan(wrapper, variant, qo_indptr, kv_indptr, indices, padded_bs)
            state[variant] = wrapper
        batch.attn_state = state


# ---------------------------------------------------------------------- helpers
class _Plans(dict):
    """A step's planned wrappers, variant -> wrapper."""

    def run(self, *args, **kwargs):
        """The one variant's run, for callers of a single-variant model (bench/gpu_checks.py)."""
        (wrapper,) = self.values()
        return wrapper.run(*args, **kwargs)


def _variant(spec: AttentionSpec) -> tuple[int, float, float]:
    """What a plan fixes for a layer: (window_left, logit soft-cap, softmax scale)."""
    window_left = spec.sliding_window - 1 if spec.sliding_window is not None else -1
    return window_left, float(spec.logit_cap), float(spec.scaling)


def _host_indptr(lengths: list[int]) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] as a pinned int32 host tensor (plan reads it on the host)."""
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return torch.from_numpy(out).pin_memory()


def _kv_indices(batch: "ForwardBatch", total: int) -> torch.Tensor:
    """KV slots of every request's positions [0, seq_len), concatenated: int32 on the device.

    Row r of the output belongs to request i = r's segment; its position is r minus the
    segment start. `total` comes from host lengths, so nothing here waits for the GPU."""
    seq_lens = batch.seq_lens
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    rows = torch.repeat_interleave(batch.req_pool_indices, seq_lens, output_size=total)
    pos = torch.arange(total, device=seq_lens.device) - \
        torch.repeat_interleave(starts, seq_lens, output_size=total)
    return batch.req_to_token[rows, pos].to(torch.int32)


_PATCHED = False


def reuse_prebuilt_modules() -> None:
    """With ASGL_FLASHINFER_PREBUILT=1, load an already built JIT module as is.

    FlashInfer asks ninja whether a cached module is fresh, and ninja rebuilds when the
    compile line differs (e.g. another Python's include path) even though the .so is the
    same. bench/gpu_suite.sh ships modules built ahead for this exact version and arch, so
    there the check is skipped; anywhere else FlashInfer's own logic stands."""
    global _PATCHED
    if _PATCHED or os.environ.get("ASGL_FLASHINFER_PREBUILT") != "1":
        return
    from flashinfer.jit import core

    for cls in vars(core).values():
        if isinstance(cls, type) and hasattr(cls, "jit_library_path") and hasattr(cls, "build"):
            original = cls.build

            def build(self, *args, _original=original, **kwargs):
                if self.jit_library_path.exists():
                    return None
                return _original(self, *args, **kwargs)

            cls.build = build
    _PATCHED = True
    logger.info("flashinfer: reusing prebuilt JIT modules without ninja checks")
