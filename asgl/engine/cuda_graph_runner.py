"""CudaGraphRunner: decode forward passes replayed from CUDA graphs.

A decode step of an 8B model launches ~500 small kernels; launched one by one from Python
that costs more than the GPU work at small batches. The worker thread captures the model's
forward (embedding -> layers -> final norm; the LM head and sampler stay outside, so graph
outputs stay small) once per batch size in `capture_sizes`, before serving starts, while
nothing else touches CUDA. A decode batch of B requests replays the smallest captured size
>= B: its inputs are copied into static buffers, and the padding rows (token 0 at
position 0) write their K/V to the reserved slot 0 and attend to it alone.

The attention backend takes part through three hooks (duck-typed, see flashinfer_backend):
`supports_cuda_graph`, `init_cuda_graph_state(max_bs, max_kv_tokens)` and
`prepare_cuda_graph(batch, padded_bs)`, which plans the padded batch and points
`batch.attn_state` at state the captured kernels read by address.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from asgl.engine.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from asgl.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, of 16 to 128 and of 32 beyond: padding wastes at
    most ~12% of a step where the batch is large enough for that to cost time."""
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, 129, 16)) + \
        list(range(160, max(max_bs, 160) + 1, 32))
    out = [s for s in sizes if s < max_bs]
    return out + [max_bs]


def backend_supports_graphs(backend) -> bool:
    return bool(getattr(backend, "supports_cuda_graph", False))


class CudaGraphRunner:
    def __init__(self, runner: "ModelRunner", max_bs: int):
        self.runner = runner
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        dev = runner.device
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(n, dtype=torch.int64, device=dev)
        self.req_pool_indices = torch.zeros(n, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int64, device=dev)
        self.arange = torch.arange(n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.batches: dict[int, ForwardBatch] = {}
        self.num_replays = 0
        # Keys the static page-index buffer holds. Requests sharing a cached prefix each
        # list its slots, so a batch's total can exceed the pool (WP: ~1.4x); past this
        # bound (8x the pool, ~14 MB of int32 for Llama-3.1-8B) a batch runs eagerly.
        self.max_kv_tokens = min(self.max_bs * runner.req_to_token.shape[1],
                                 8 * (runner.kv_pool.num_tokens + 1))

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.mode == ForwardMode.DECODE and batch.batch_size <= self.max_bs
                and batch.prompt_lp_rows is None
                and sum(batch.seq_lens_cpu) <= self.max_kv_tokens)

    # ------------------------------------------------------------------ capture
    def capture(self) -> None:
        r = self.runner
        t0 = time.perf_counter()
        r.attn_backend.init_cuda_graph_state(self.max_bs, self.max_kv_tokens)
        before = torch.cuda.memory_allocated(r.device)
        pool = None
        for bs in reversed(self.sizes):  # largest first: smaller ones reuse its pool memory
            batch = self._static_batch(bs)
            r.attn_backend.prepare_cuda_graph(batch, bs)
            for _ in range(2):  # warm-up: lazy handles and autotuning happen outside capture
                self._forward(batch)
            torch.cuda.synchronize(r.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(batch)
            pool = graph.pool()
            self.graphs[bs], self.outputs[bs], self.batches[bs] = graph, out, batch
        torch.cuda.synchronize(r.device)
        logger.info("captured %d CUDA graphs (batch sizes %d..%d) in %.1fs, %.0f MiB",
                    len(self.sizes), self.sizes[0], self.max_bs, time.perf_counter() - t0,
                    (torch.cuda.memory_allocated(r.device) - before) / 2**20)

    def _static_batch(self, bs: int) -> ForwardBatch:
        r = self.runner
        return ForwardBatch(
            mode=ForwardMode.DECODE, batch_size=bs, input_ids=self.input_ids[:bs],
            positions=self.positions[:bs], out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            prefix_lens=self.seq_lens[:bs] - 1, extend_lens=self.seq_lens[:bs],
            extend_start_loc=self.arange[:bs], seq_lens_cpu=[1] * bs, prefix_lens_cpu=[0] * bs,
            extend_lens_cpu=[1] * bs, logits_indices=self.arange[:bs],
            sample_rows=self.arange[:bs], req_to_token=r.req_to_token, kv_pool=r.kv_pool,
            attn_backend=r.attn_backend)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.runner.model(batch.input_ids, batch.positions, batch)

    # ------------------------------------------------------------------ replay
    def prepare(self, batch: ForwardBatch, input_ids: torch.Tensor) -> None:
        """Copy a decode batch (tensors on the device) into the static inputs of the
        smallest captured size that fits, pad, and plan attention for it."""
        bs = batch.batch_size
        padded = self.sizes[bisect.bisect_left(self.sizes, bs)]
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        if padded > bs:
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
            self.out_cache_loc[bs:padded].zero_()  # slot 0: the padding slot
        self.runner.attn_backend.prepare_cuda_graph(batch, padded)
        batch.extra["graph_bs"] = padded

    def launch(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay; returns the hidden states [B, hidden] of the batch's real rows."""
        padded = batch.extra.pop("graph_bs")
        self.graphs[padded].replay()
        self.num_replays += 1
        return self.outputs[padded][:batch.batch_size]
