"""ModelRunner: owns one device's model, KV pool, attention backend and sampler.

Everything here runs in the device's worker thread (asgl/engine/worker.py): the
constructor loads the model there, so the device, the inference mode and (later) the
CUDA streams and graphs all belong to that thread. `step` takes a ForwardBatch with host
tensors, runs the forward pass and the sampler, and returns plain Python results.

On CUDA (the GPU path):
- memory is planned in order: weights, then a reserve for activations and CUDA graphs
  (1 - --mem-fraction-static of the card), then the KV pool from what is left;
- each step's host tensors travel in one pinned buffer and one copy; the scheduler's
  request-to-token writes are replayed on the device copy of the table;
- decode batches, and prefill / mixed batches of up to --cuda-graph-max-tokens tokens,
  replay CUDA graphs (cuda_graph_runner.py) when the attention backend supports them;
  the only host sync is reading back the sampled ids at the end of the step (pinned copy
  + event), which the worker thread waits on while the event loop works;
- CUDA events around every step measure the GPU's busy time and its idle gaps between
  steps (`gpu_stats`).
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any, Optional

import torch

from asgl.config import EngineConfig
from asgl.distributed import get_tp_rank
from asgl.engine.contracts.forward_batch import ForwardBatch
from asgl.engine.contracts.step import StepOutput, StepPlan
from asgl.engine.worker.isolation import sample_isolated
from asgl.engine.worker.kv_cache import KVPool
from asgl.engine.worker.latent_kv_cache import (LatentKVPool, create_kv_pool, describe_layout,
                                                kv_bytes_per_token)
from asgl.engine.worker.step_io import GpuStepStats, PendingResults, timing_event, upload
from asgl.engine.worker.torch_compile import compiled_forward
from asgl.kernels.attention import AttentionBackend, create_attention_backend

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(cfg: EngineConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    return torch.device(cfg.device)


def resolve_dtype(cfg: EngineConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class ModelRunner:
    def __init__(self, cfg: EngineConfig, source: Any):
        from asgl.engine.sampling.sampler import Sampler
        from asgl.layers.quantization import get_quant_config
        from asgl.layers.quantization.kv_scales import KVScaleCollector
        from asgl.layers.quantization.loading import (cast_unquantized, describe_savings,
                                                      process_after_loading)
        from asgl.layers.quantization.torchao import apply_torchao
        from asgl.models.dummy_weights import init_dummy_weights
        from asgl.models.model_impl import resolve_model_class

        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.on_cuda = self.device.type == "cuda"
        if self.on_cuda:  # set_device needs an index; "cuda" alone means the current one
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(cfg, self.device)
        torch.set_grad_enabled(False)
        hf_config = source.hf_config
        self.hf_config = hf_config
        arch = list(getattr(hf_config, "architectures", None) or [])
        model_cls = resolve_model_class(hf_config, cfg.model_impl, is_embedding=cfg.is_embedding)
        t0 = time.perf_counter()
        spec = getattr(source, "quantization", None)
        self.quant_config = get_quant_config(spec)
        # Parameters are created directly on the device in the model dtype (torch.empty):
        # dummy weights are then drawn there, which takes well under a second for 8B.
        with torch.device(self.device):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                model = (model_cls(hf_config) if self.quant_config is None
                         else model_cls(hf_config, self.quant_config))
            finally:
                torch.set_default_dtype(prev)
        model.quant_config = self.quant_config  # TP dummy weights rebuild the same layers
        kv_scales = KVScaleCollector()
        if source.is_dummy:
            init_dummy_weights(model, seed=cfg.random_seed or 0)
            process_after_loading(model)  # e.g. --quantization fp8 quantizes the draws
        elif hasattr(model, "load_from_source"):  # a model that reads the directory itself
            model.load_from_source(source)
        else:
            model.load_weights(kv_scales.filter(source.iter_weights(progress=get_tp_rank() == 0)))
        self.model = cast_unquantized(model, self.dtype).eval()
        scheme = spec.name if spec is not None else None
        if cfg.torchao_config:
            apply_torchao(self.model, cfg.torchao_config, self.device.type)
            scheme = f"torchao {cfg.torchao_config}"
        self.weight_bytes, self.quant_note = describe_savings(self.model, self.dtype, scheme)
        self.kv_scale_note = kv_scales.apply(self.model, self.kv_dtype())
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
            if scheme is not None:
                # the 16-bit tensors quantization replaced sit in the caching allocator,
                # which mem_get_info counts as used: give them back so the KV pool gets them
                torch.cuda.empty_cache()
        logger.info("model %s loaded in %.1fs (%s, %s, %.2f GiB of weights%s)",
                    arch[0] if arch else "?", time.perf_counter() - t0, self.device,
                    str(self.dtype).replace("torch.", ""), self.weight_bytes / 2**30,
                    f", {scheme}" if scheme else "")
        self.compiled = compiled_forward(cfg, self.model, self.device)
        text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()  # (VLMs)
        self.vocab_size = int(text_config.vocab_size)
        self.sampler = Sampler(self._sampling_backend())
        self.attn_backend = self._create_attention_backend()
        self.kv_pool: Optional[KVPool | LatentKVPool] = None
        self.req_to_token: Optional[torch.Tensor] = None
        self.last_next_ids: Optional[torch.Tensor] = None
        self.graph_runner = None
        self.gpu_stats = GpuStepStats()
        self.mm_encoder = None  # vision-language models: images into input embeddings
        if hasattr(self.model, "encode_images"):
            from asgl.engine.worker.mm_encoder import MultimodalEncoder
            self.mm_encoder = MultimodalEncoder(self.model, self.device, self.vocab_size)

    def _sampling_backend(self) -> str:
        """pytorch unless flashinfer is asked for and can run here (CUDA, importable)."""
        if self.cfg.sampling_backend != "flashinfer":
            return "pytorch"
        if not self.on_cuda:
            logger.warning("--sampling-backend flashinfer needs CUDA: sampling with pytorch")
            return "pytorch"
        try:
            import flashinfer.sampling  # noqa: F401
        except ImportError as exc:
            logger.warning("--sampling-backend flashinfer unavailable (%s): sampling with "
                           "pytorch", exc)
            return "pytorch"
        return "flashinfer"

    def _create_attention_backend(self) -> AttentionBackend:
        """The configured backend; on CUDA flashinfer by default when it can run this model,
        else triton; torch (the reference: correct everywhere, slow on a GPU) on the CPU."""
        from asgl.layers.attention import Attention

        name = self.cfg.attention_backend or ("flashinfer" if self.on_cuda else "torch")
        if name == "torch":
            return create_attention_backend("torch")
        specs = [m.spec for m in self.model.modules() if isinstance(m, Attention)]
        kwargs: dict[str, Any] = {}
        if any(s.kv_latent for s in specs) and self.cfg.attention_backend is None:
            name = "triton"  # MLA on CUDA: the tested kernels unless flashinfer is asked for
        if name == "flashinfer" and specs[0].kv_latent:  # MLA: FlashInfer's latent kernels
            s = specs[0]
            name = "flashinfer_mla"
            kwargs = dict(device=self.device, num_heads=s.num_heads, kv_lora_rank=s.v_dim,
                          rope_dim=s.head_dim - s.v_dim, sm_scale=s.scaling, dtype=self.dtype,
                          kv_dtype=self.kv_dtype())
        elif name == "flashinfer":  # plans need the model's head shapes and dtypes up front
            s = specs[0]
            kwargs = dict(device=self.device, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                          head_dim=s.head_dim, dtype=self.dtype, kv_dtype=self.kv_dtype())
        try:
            backend = create_attention_backend(name, **kwargs)
            for spec in specs:
                if hasattr(backend, "check_spec"):
                    backend.check_spec(spec)
        except (ImportError, NotImplementedError) as exc:
            if self.cfg.attention_backend:  # asked for explicitly: say why it cannot run
                raise
            # Triton runs every layer kind (windows, soft-caps, fp8 KV, ALiBi, any head dim):
            # far faster on a GPU than torch, the last resort.
            fallback = "triton" if self.on_cuda else "torch"
            logger.warning("attention backend %s unavailable (%s): using %s", name, exc, fallback)
            return create_attention_backend(fallback)
        if name == "triton" and self.on_cuda and any(s.kv_latent for s in specs):
            backend.enable_decode_graphs()  # MLA: latent decode kernel, graph-safe
        logger.info("attention backend: %s", name)
        return backend

    # ------------------------------------------------------------------ memory
    def kv_capacity(self) -> int:
        """How many tokens the KV pool can hold, from the config's memory budget.

        On CUDA: the pool gets `total * mem_fraction_static` minus what the weights (and
        anything else allocated so far) already use; the remaining `1 - fraction` of the
        card is left for activations, the request table, CUDA graphs and workspaces."""
        m = self.model
        kv_dtype = self.kv_dtype()
        per_token = kv_bytes_per_token(m, kv_dtype)
        if self.cfg.max_total_tokens:
            return self.cfg.max_total_tokens
        if self.on_cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            frac = self.cfg.mem_fraction_static or 0.88
            used = total - free
            budget = total * frac - used
            if budget <= per_token * 16:
                raise RuntimeError("not enough GPU memory left for the KV cache: "
                                   "raise --mem-fraction-static")
            tokens = int(budget // per_token)
            logger.info("GPU memory plan: %.1f GiB card, %.1f GiB in use (weights %.1f), "
                        "%.1f GiB reserved for activations/graphs (1 - %.2f), KV pool %.1f GiB "
                        "= %d tokens (%d KiB each, %s)%s", total / 2**30, used / 2**30,
                        self.weight_bytes / 2**30, total * (1 - frac) / 2**30, frac,
                        budget / 2**30, tokens, per_token // 1024,
                        str(kv_dtype).replace("torch.", ""), self.quant_note)
            return tokens
        return int(self.cfg.cpu_kv_budget_gb * (1 << 30) // per_token)

    def kv_dtype(self) -> torch.dtype:
        name = self.cfg.kv_cache_dtype
        if name == "auto":
            return self.dtype
        if name.startswith("fp8"):
            return torch.float8_e4m3fn if name == "fp8_e4m3" else torch.float8_e5m2
        return _DTYPES[name]

    def init_memory(self, num_tokens: int, max_reqs: int, context_len: int) -> None:
        """Allocate the KV pool and the device request table, then capture CUDA graphs
        (here, in the worker thread, before the engine serves anything)."""
        m, kv_dtype = self.model, self.kv_dtype()
        self.kv_pool = create_kv_pool(m, num_tokens, kv_dtype, self.device)
        per_token = kv_bytes_per_token(m, kv_dtype)
        logger.info("KV pool: %d tokens, %d bytes per token (%s) = %d tokens per GiB",
                    num_tokens, per_token, describe_layout(m, kv_dtype), (1 << 30) // per_token)
        if self.device.type != "cpu":
            self.req_to_token = torch.zeros((max_reqs, context_len), dtype=torch.int64,
                                            device=self.device)
        if self.on_cuda:
            self._maybe_capture_graphs(max_reqs)

    def _maybe_capture_graphs(self, max_reqs: int) -> None:
        from asgl.engine.worker.cuda_graph_runner import (DEFAULT_MAX_EXTEND_TOKENS, CudaGraphRunner,
                                                   backend_supports_graphs)

        if self.cfg.disable_cuda_graph:
            return
        if not backend_supports_graphs(self.attn_backend):
            logger.info("CUDA graphs off: the %s attention backend cannot be captured",
                        self.attn_backend.name)
            return
        # every decode batch the scheduler can form (W1000 runs ~600 requests at once)
        max_bs = min(self.cfg.cuda_graph_max_bs or 1024, max_reqs)
        max_tokens = self.cfg.cuda_graph_max_tokens
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_EXTEND_TOKENS
        if not getattr(self.attn_backend, "graph_extend", True):
            max_tokens = 0  # the backend captures decode batches only
        # an extend graph's padded request may not be longer than a table row: with a context
        # shorter than 1,024 tokens the capture itself indexed past the row (device assert)
        max_tokens = min(max_tokens, self.req_to_token.shape[1])
        with torch.inference_mode():
            runner = CudaGraphRunner(self, max_bs, max_tokens)
            runner.capture()
        self.graph_runner = runner

    # ------------------------------------------------------------------ step
    def step(self, plan: StepPlan) -> StepOutput:
        """Run one step of the loop's host-side plan. `plan.sampling` is None on tensor-
        parallel ranks other than 0, which only compute (tp.py)."""
        with torch.inference_mode():
            sampling = plan.sampling.to(self.device) if plan.sampling is not None else None
            if self.on_cuda:
                return self._step_cuda(plan.forward, sampling, plan.table_writes)
            return self._step(plan.forward, sampling, plan.req_to_token, plan.table_writes)

    def _step(self, batch, sampling, req_to_token_host, table_writes) -> StepOutput:
        t0 = time.perf_counter()
        if self.req_to_token is None:
            table = req_to_token_host  # CPU: the scheduler's table is the device table
        else:
            table = self.req_to_token
            if table_writes is not None:
                rows, cols, vals = (t.to(self.device, non_blocking=True) for t in table_writes)
                table[rows, cols] = vals
        batch.to(self.device)
        self._attach(batch, table)
        logits = self._logits(batch, self._input_ids(batch))
        out = PendingResults(self._sample(batch, logits, sampling), batch, logits).wait()
        out.forward_seconds = time.perf_counter() - t0
        return out

    def _step_cuda(self, batch, sampling, table_writes) -> StepOutput:
        """Launch the step and return at once; `out.wait` (run by the engine off the loop,
        on DeviceWorker.finish) blocks until the GPU is done and fills the host lists.

        So the worker launches step N+1 while step N still runs: the GPU never waits for
        Python between steps, and the worker's launches never convoy the loop's Python on
        the GIL (the loop is waiting for N's results meanwhile, in another thread)."""
        t0 = time.perf_counter()
        upload(batch, table_writes, self.device)
        if table_writes is not None:
            rows, cols, vals = batch.extra.pop("table_writes")
            self.req_to_token[rows, cols] = vals
        self._attach(batch, self.req_to_token)
        ids = self._input_ids(batch)
        graph = self.graph_runner
        # steps with image rows run eagerly: the graphs were captured over token ids
        key = graph.graph_key(batch) if graph is not None and "mm" not in batch.extra else None
        if key is not None:
            graph.prepare(batch, ids, key)
        else:
            graph = None
            self.attn_backend.prepare(batch)
        start = timing_event()  # after host-side planning: gaps before it are GPU idle
        hidden = graph.launch(batch) if graph is not None else self.forward(batch, ids)
        logits = self._logits_cuda(hidden, batch.logits_indices)
        out = self._sample(batch, logits, sampling)
        pending = PendingResults(out, batch, logits, start, self.gpu_stats,
                                 decode=batch.mode.is_decode, graph=graph is not None)
        out.wait = pending.wait
        out.forward_seconds = time.perf_counter() - t0
        return out

    def _logits_cuda(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The LM head over `rows` of `hidden`, with the row count padded to a decode graph
        size (padding repeats row 0; its logits are dropped). cuBLAS picks its kernel by
        the row count and loads it on first use, which costs milliseconds mid-serving
        (a step of 9 logits rows after many of 8 took 12 ms more): with the padding only
        the graph sizes occur, and capture warms each of them."""
        n = rows.numel()
        graph = self.graph_runner
        if graph is not None and 0 < n <= graph.max_bs:
            padded = graph.sizes[bisect.bisect_left(graph.sizes, n)]
            if padded > n:
                rows = torch.cat([rows, graph.zero_rows[:padded - n]])
            return self.model.compute_logits(hidden[rows])[:n]
        return self.model.compute_logits(hidden[rows])

    # ------------------------------------------------------------------ pieces
    def _attach(self, batch: ForwardBatch, table: torch.Tensor) -> None:
        batch.req_to_token = table
        batch.kv_pool = self.kv_pool
        batch.attn_backend = self.attn_backend

    def _input_ids(self, batch: ForwardBatch) -> torch.Tensor:
        ids = batch.input_ids
        if batch.extra.get("placeholders"):
            # placeholders (-1 - k) point at the previous step's k-th sampled token
            ids = torch.where(ids < 0, self.last_next_ids[(-1 - ids).clamp(min=0)], ids)
        return ids

    def forward(self, batch: ForwardBatch, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states of the batch's tokens: compiled for small batches when asked."""
        chunks = batch.extra.get("mm")
        if chunks:  # image rows: their features replace the image tokens' embeddings
            embeds = self.mm_encoder.input_embeds(ids, chunks)
            return self.model(ids, batch.positions, batch, input_embeds=embeds)
        compiled = self.compiled
        if compiled is not None and compiled.wants(batch.num_tokens):
            return compiled.forward(ids, batch.positions, batch)
        return self.model(ids, batch.positions, batch)

    def _logits(self, batch: ForwardBatch, ids: torch.Tensor) -> torch.Tensor:
        self.attn_backend.prepare(batch)
        hidden = self.forward(batch, ids)
        return self.model.compute_logits(hidden[batch.logits_indices])

    def _sample(self, batch: ForwardBatch, logits: torch.Tensor, sampling: Any) -> StepOutput:
        """Sample on the device; `next_ids` stays a device tensor until the caller reads it."""
        out = StepOutput(next_ids=[])
        # sampling=None: a tensor-parallel rank other than 0, which only computes (tp.py)
        if sampling is not None and batch.sample_rows.numel():
            rows = logits[batch.sample_rows]
            try:
                sample_out = self.sampler.sample(rows, sampling)
            except Exception:  # noqa: BLE001 - maybe one request's parameters: find it
                logger.exception("sampling a step of %d rows failed; isolating", sampling.size)
                sample_out, out.failed_rows = sample_isolated(self.sampler, rows, sampling)
            self.last_next_ids = sample_out.next_token_ids
            out.next_ids = sample_out.next_token_ids
            out.extra_sample = sample_out
        return out
