"""ModelRunner: owns one device's model, KV pool, attention backend and sampler.

Everything here runs in the device's worker thread (asgl/engine/worker.py): the
constructor loads the model there, so the device, the inference mode and (later) the
CUDA streams and graphs all belong to that thread. `step` takes a ForwardBatch with host
tensors, runs the forward pass and the sampler, and returns plain Python results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from asgl.config import EngineConfig
from asgl.engine.forward_batch import ForwardBatch
from asgl.engine.kv_pool import KVPool
from asgl.engine.logprobs import compute_prompt_logprobs
from asgl.kernels.attention import create_attention_backend

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StepOutput:
    next_ids: list[int]
    logprobs: Optional[list[float]] = None
    top_ids: Optional[list[list[int]]] = None
    top_values: Optional[list[list[float]]] = None
    prompt_logprobs: Optional[list[float]] = None
    prompt_top_ids: Optional[list[list[int]]] = None
    prompt_top_values: Optional[list[list[float]]] = None
    forward_seconds: float = 0.0


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
        from asgl.engine.sampler import Sampler
        from asgl.models.loader import init_dummy_weights
        from asgl.models.registry import get_model_class

        self.cfg = cfg
        self.device = resolve_device(cfg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(cfg, self.device)
        torch.set_grad_enabled(False)
        hf_config = source.hf_config
        self.hf_config = hf_config
        arch = list(getattr(hf_config, "architectures", None) or [])
        model_cls = get_model_class(arch)
        t0 = time.perf_counter()
        with torch.device(self.device):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                model = model_cls(hf_config)
            finally:
                torch.set_default_dtype(prev)
        if source.is_dummy:
            init_dummy_weights(model, seed=cfg.random_seed or 0)
        else:
            model.load_weights(source.iter_weights())
        self.model = model.to(self.dtype).eval()
        logger.info("model %s loaded in %.1fs (%s, %s)", arch[0] if arch else "?",
                    time.perf_counter() - t0, self.device, str(self.dtype).replace("torch.", ""))
        self.vocab_size = int(hf_config.vocab_size)
        self.sampler = Sampler()
        self.attn_backend = create_attention_backend(cfg.attention_backend or "torch")
        self.kv_pool: Optional[KVPool] = None
        self.req_to_token: Optional[torch.Tensor] = None
        self.last_next_ids: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ memory
    def kv_capacity(self) -> int:
        """How many tokens the KV pool can hold, from the config's memory budget."""
        m = self.model
        kv_dtype = self.kv_dtype()
        per_token = KVPool.bytes_per_token(m.num_layers, m.num_kv_heads, m.head_dim, kv_dtype)
        if self.cfg.max_total_tokens:
            return self.cfg.max_total_tokens
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            frac = self.cfg.mem_fraction_static or 0.88
            used = total - free
            budget = total * frac - used
            if budget <= per_token * 16:
                raise RuntimeError("not enough GPU memory left for the KV cache: "
                                   "raise --mem-fraction-static")
            return int(budget // per_token)
        return int(self.cfg.cpu_kv_budget_gb * (1 << 30) // per_token)

    def kv_dtype(self) -> torch.dtype:
        name = self.cfg.kv_cache_dtype
        if name == "auto":
            return self.dtype
        if name.startswith("fp8"):
            return torch.float8_e4m3fn if name == "fp8_e4m3" else torch.float8_e5m2
        return _DTYPES[name]

    def init_memory(self, num_tokens: int, max_reqs: int, context_len: int) -> None:
        m = self.model
        self.kv_pool = KVPool(num_tokens, m.num_layers, m.num_kv_heads, m.head_dim,
                              self.kv_dtype(), self.device)
        if self.device.type != "cpu":
            self.req_to_token = torch.zeros((max_reqs, context_len), dtype=torch.int64,
                                            device=self.device)

    # ------------------------------------------------------------------ step
    def step(self, batch: ForwardBatch, sampling: Any, req_to_token_host: torch.Tensor,
             table_writes=None) -> StepOutput:
        with torch.inference_mode():
            return self._step(batch, sampling, req_to_token_host, table_writes)

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
        batch.req_to_token = table
        batch.kv_pool = self.kv_pool
        batch.attn_backend = self.attn_backend
        ids = batch.input_ids
        if batch.extra.get("placeholders"):
            # placeholders (-1 - k) point at the previous step's k-th sampled token
            ids = torch.where(ids < 0, self.last_next_ids[(-1 - ids).clamp(min=0)], ids)
        self.attn_backend.prepare(batch)
        hidden = self.model(ids, batch.positions, batch)
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        out = StepOutput(next_ids=[])
        if batch.sample_rows.numel():
            sample_out = self.sampler.sample(logits[batch.sample_rows], sampling)
            self.last_next_ids = sample_out.next_token_ids
            out.next_ids = sample_out.next_token_ids.tolist()
            if sample_out.logprobs is not None:
                out.logprobs = sample_out.logprobs.tolist()
            if getattr(sample_out, "top_logprobs_ids", None) is not None:
                out.top_ids = sample_out.top_logprobs_ids.tolist()
                out.top_values = sample_out.top_logprobs_values.tolist()
        if batch.prompt_lp_rows is not None:
            lp = compute_prompt_logprobs(logits[batch.prompt_lp_rows], batch.prompt_lp_targets,
                                         batch.prompt_lp_topk)
            out.prompt_logprobs = lp.token_logprobs.tolist()
            if lp.top_ids is not None:
                out.prompt_top_ids, out.prompt_top_values = lp.top_ids.tolist(), lp.top_values.tolist()
        out.forward_seconds = time.perf_counter() - t0
        return out
