"""CudaGraphRunner: decode and small extend forward passes replayed from CUDA graphs.

A forward pass of an 8B model launches ~500 small kernels; launched one by one from Python
that costs more than the GPU work unless the step carries many tokens. The worker thread
captures the model's forward (embedding -> layers -> final norm; the LM head and sampler
stay outside, so graph outputs stay small) before serving starts, while nothing else
touches CUDA, for two families of shapes:

- decode graphs, one per batch size in `capture_sizes`: a decode batch of B requests
  replays the smallest captured size >= B; padding rows (token 0 at position 0) write
  their K/V to the reserved slot 0 and attend to it alone;
- extend graphs, one per token count in `extend_token_sizes` (up to
  `--cuda-graph-max-tokens`), all for the same number of attention requests
  (`EXTEND_GRAPH_BS`): prefill chunks mixed with decodes (chunked prefill), jump-forward
  extends of constrained requests and small prefills. A batch of B < EXTEND_GRAPH_BS
  requests and T tokens replays the smallest size >= T; the padding requests get no
  tokens except the last, which takes the T_pad - T padding tokens (slot 0, position 0),
  attending causally over as many copies of slot 0. FlashInfer's graph-mode plans accept
  any split of the captured token count over the captured batch size, so one graph per
  token count serves every mix of prefill and decode rows.

The attention backend takes part through three hooks (duck-typed, see flashinfer_backend):
`supports_cuda_graph`, `init_cuda_graph_state(shapes, max_kv_tokens)` and
`prepare_cuda_graph(batch, padded_bs, padded_tokens)`, which plans the padded batch and
points `batch.attn_state` at state the captured kernels read by address.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING, Optional

import torch

from asgl.engine.contracts.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from asgl.engine.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, of 16 to 128 and of 32 beyond: padding wastes at
    most ~12% of a step where the batch is large enough for that to cost time."""
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, 129, 16)) + \
        list(range(160, max(max_bs, 160) + 1, 32))
    out = [s for s in sizes if s < max_bs]
    return out + [max_bs]


# Attention requests of every extend graph: batches of up to EXTEND_GRAPH_BS - 1 requests
# replay them (one request slot is left for the padding tokens). Padding requests that get
# no tokens cost the attention kernel nothing, so one size serves every batch.
EXTEND_GRAPH_BS = 64
DEFAULT_MAX_EXTEND_TOKENS = 1024


def extend_token_sizes(max_tokens: int) -> list[int]:
    """Token counts of the extend graphs: steps of 64 to 512, then of 128, up to
    `max_tokens` (padding wastes at most ~50% on the smallest steps, where launches cost
    more than the matmuls, and ~12% above 512 tokens). Never fewer tokens than the graphs'
    requests: (64, 64) is also the decode graph of 64 rows, which serves both."""
    if max_tokens <= 0:
        return []
    sizes = list(range(EXTEND_GRAPH_BS, 513, 64)) + list(range(640, max(max_tokens, 640) + 1, 128))
    return [s for s in sizes if s < max_tokens] + [max(max_tokens, EXTEND_GRAPH_BS)]


def backend_supports_graphs(backend) -> bool:
    return bool(getattr(backend, "supports_cuda_graph", False))


class CudaGraphRunner:
    def __init__(self, runner: "ModelRunner", max_bs: int, max_extend_tokens: int = 0):
        self.runner = runner
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.extend_sizes = extend_token_sizes(max_extend_tokens)
        self.max_extend_tokens = self.extend_sizes[-1] if self.extend_sizes else 0
        dev = runner.device
        n = max(self.max_bs, self.max_extend_tokens, EXTEND_GRAPH_BS)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(n, dtype=torch.int64, device=dev)
        self.req_pool_indices = torch.zeros(n, dtype=torch.int64, device=dev)
        self.arange = torch.arange(n, dtype=torch.int64, device=dev)
        self.zero_rows = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        # keyed by (padded requests, padded tokens): decode graphs have the two equal
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.batches: dict[tuple[int, int], ForwardBatch] = {}
        self.num_replays = self.num_extend_replays = 0
        # Keys the static page-index buffer holds (padding included). Requests sharing a
        # cached prefix each list its slots, so a batch's total can exceed the pool (WP:
        # ~1.4x); past this bound (8x the pool, ~14 MB of int32 for Llama-3.1-8B) a batch
        # runs eagerly.
        self.max_kv_tokens = min(max(self.max_bs, EXTEND_GRAPH_BS) * runner.req_to_token.shape[1],
                                 8 * (runner.kv_pool.num_tokens + 1))

    def graph_key(self, batch: ForwardBatch) -> Optional[tuple[int, int]]:
        """The captured (requests, tokens) this batch replays, or None: run it eagerly."""
        if batch.prompt_lp_rows is not None:
            return None
        bs = batch.batch_size
        if batch.mode == ForwardMode.DECODE:
            if bs > self.max_bs:
                return None
            padded = self.sizes[bisect.bisect_left(self.sizes, bs)]
            key = (padded, padded)
        elif batch.mode in (ForwardMode.EXTEND, ForwardMode.MIXED):
            tokens = batch.num_tokens
            if bs >= EXTEND_GRAPH_BS or tokens > self.max_extend_tokens:
                return None
            key = (EXTEND_GRAPH_BS, self.extend_sizes[bisect.bisect_left(self.extend_sizes, tokens)])
        else:
            return None
        if sum(batch.seq_lens_cpu) + key[0] + key[1] > self.max_kv_tokens:
            return None
        return key

    # ------------------------------------------------------------------ capture
    def capture(self) -> None:
        r = self.runner
        t0 = time.perf_counter()
        # largest first (the biggest activations): smaller ones reuse the pool's memory
        keys = sorted({(bs, bs) for bs in self.sizes} |
                      {(EXTEND_GRAPH_BS, t) for t in self.extend_sizes},
                      key=lambda k: (k[1], k[0]), reverse=True)
        r.attn_backend.init_cuda_graph_state(keys, self.max_kv_tokens)
        before = torch.cuda.memory_allocated(r.device)
        pool = None
        for key in keys:
            batch = self._static_batch(*key)
            r.attn_backend.prepare_cuda_graph(batch, *key)
            for _ in range(2):  # warm-up: lazy handles and autotuning happen outside capture
                self._forward(batch)
            torch.cuda.synchronize(r.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(batch)
            pool = graph.pool()
            self.graphs[key], self.outputs[key], self.batches[key] = graph, out, batch
        # the LM head runs outside the graphs on row counts padded to these sizes
        # (ModelRunner._logits_cuda): load each size's cuBLAS kernel now, not mid-serving
        hidden = self.outputs[keys[0]]
        for bs in self.sizes:
            r.model.compute_logits(hidden[self.zero_rows[:bs]])
        torch.cuda.synchronize(r.device)
        logger.info("captured %d CUDA graphs (decode batch sizes %d..%d; extend token counts "
                    "%s) in %.1fs, %.0f MiB", len(keys), self.sizes[0], self.max_bs,
                    f"{self.extend_sizes[0]}..{self.max_extend_tokens}" if self.extend_sizes
                    else "none", time.perf_counter() - t0,
                    (torch.cuda.memory_allocated(r.device) - before) / 2**20)

    def _static_batch(self, bs: int, tokens: int) -> ForwardBatch:
        """The batch a graph is captured with: decode (bs == tokens) rows of one token, or
        an extend batch of `bs` requests whose tokens all belong to the last one (the
        others have no query and one key, as padding requests have at replay)."""
        r = self.runner
        if bs == tokens:
            mode, extend, seq = ForwardMode.DECODE, [1] * bs, [1] * bs
        else:
            mode, extend = ForwardMode.EXTEND, [0] * (bs - 1) + [tokens]
            seq = [1] * (bs - 1) + [tokens]
        dev = r.device
        seq_t = torch.tensor(seq, dtype=torch.int64, device=dev)
        extend_t = torch.tensor(extend, dtype=torch.int64, device=dev)
        return ForwardBatch(
            mode=mode, batch_size=bs, input_ids=self.input_ids[:tokens],
            positions=self.positions[:tokens], out_cache_loc=self.out_cache_loc[:tokens],
            req_pool_indices=self.req_pool_indices[:bs], seq_lens=seq_t,
            prefix_lens=seq_t - extend_t, extend_lens=extend_t,
            extend_start_loc=torch.cumsum(extend_t, 0) - extend_t, seq_lens_cpu=seq,
            prefix_lens_cpu=[s - e for s, e in zip(seq, extend)], extend_lens_cpu=extend,
            logits_indices=self.arange[:bs], sample_rows=self.arange[:bs],
            req_to_token=r.req_to_token, kv_pool=r.kv_pool, attn_backend=r.attn_backend)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.runner.forward(batch, batch.input_ids)

    # ------------------------------------------------------------------ replay
    def prepare(self, batch: ForwardBatch, input_ids: torch.Tensor,
                key: tuple[int, int]) -> None:
        """Copy a batch (tensors on the device) into the static inputs of the graph `key`
        (from `graph_key`), pad, and plan attention for it."""
        n, padded = batch.num_tokens, key[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(batch.positions)
        self.out_cache_loc[:n].copy_(batch.out_cache_loc)
        if padded > n:
            self.input_ids[n:padded].zero_()
            self.positions[n:padded].zero_()
            self.out_cache_loc[n:padded].zero_()  # slot 0: the padding slot
        self.runner.attn_backend.prepare_cuda_graph(batch, *key)
        batch.extra["graph_key"] = key

    def launch(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay; returns the hidden states [T, hidden] of the batch's real tokens."""
        key = batch.extra.pop("graph_key")
        self.graphs[key].replay()
        if key[0] == key[1]:
            self.num_replays += 1
        else:
            self.num_extend_replays += 1
        return self.outputs[key][:batch.num_tokens]
