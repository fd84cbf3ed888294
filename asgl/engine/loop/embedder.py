"""Embedder: serves embedding models (`--is-embedding`) without a KV cache.

Design: every embedding model, encoder (BERT) or decoder (e5-mistral, gte-Qwen2), runs
here as one forward pass per batch with `batch.kv_pool = None`; the attention backend
then attends each sequence over its own tokens, with the mask its layers ask for
(bidirectional for BERT, causal for decoders). No KV slot, radix node or scheduler step is
involved, so nothing has to be freed afterwards and a prompt cannot be retracted halfway.
Prompts are never chunked: an input is at most the context length, and a batch holds up
to `max_prefill_tokens` tokens (a longer single input runs alone).

Threads: `embed` (event loop) tokenizes, validates and queues inputs; one batching task
(event loop) takes what is queued and runs `encode_batch` (asgl/engine/worker/encode.py)
on the device's worker thread, so
inputs that arrive while a batch runs go together into the next one.

Pooling follows the model's sentence-transformers files: `modules.json` (Pooling, then an
optional Normalize) and `1_Pooling/config.json` (cls / mean / max / lasttoken / ...; the
legacy `pooling_mode_*` flags or the newer `pooling_mode`). Without them: the model's
`default_pooling` (BERT: CLS, decoders: last token), normalized, as SGLang does.

Long inputs are refused (InvalidRequest) unless the caller passes `truncate=True`; then a
text is cut by the tokenizer to the context length (special tokens kept, on the
tokenizer's truncation side, right by default) and token ids keep their first tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import msgspec

from asgl.config import EngineConfig
from asgl.engine.contracts.errors import InvalidRequest
from asgl.engine.worker.encode import encode_batch

logger = logging.getLogger(__name__)

EmbedInput = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]]
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_FLAGS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}
# Tokenizing this many characters can take milliseconds: do it off the loop.
_OFFLOAD_CHARS = 4096


class EmbeddingOutput(msgspec.Struct):
    index: int  # position among the call's inputs
    embedding: list[float]
    prompt_tokens: int  # after truncation


@dataclass(frozen=True)
class PoolingConfig:
    modes: tuple[str, ...]  # several modes: their vectors are concatenated, in this order
    normalize: bool
    hidden_size: int
    max_seq_length: Optional[int] = None  # sentence_bert_config.json
    lowercase: bool = False  # sentence_bert_config.json's do_lower_case
    # Matryoshka: the output sizes the model was trained to be truncated to (None: any size
    # up to the full one when `matryoshka` is set, else only the full size).
    matryoshka: bool = False
    matryoshka_dims: Optional[tuple[int, ...]] = None

    @property
    def dim(self) -> int:
        return self.hidden_size * len(self.modes)

    @classmethod
    def discover(cls, model_dir: Optional[str], hf_config: Any,
                 default_mode: str) -> "PoolingConfig":
        """From the sentence-transformers files in `model_dir`, else the model's default."""
        hidden = int(hf_config.hidden_size)
        dims = getattr(hf_config, "matryoshka_dimensions", None)
        common = dict(hidden_size=hidden,
                      matryoshka=bool(getattr(hf_config, "is_matryoshka", False) or dims),
                      matryoshka_dims=tuple(int(d) for d in dims) if dims else None)
        modules = _read_json(model_dir, "modules.json") if model_dir else None
        if not isinstance(modules, list):
            return cls(modes=(default_mode,), normalize=True, **common)
        modes, normalize, max_len, lowercase = (default_mode,), False, None, False
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            path = os.path.join(model_dir, module.get("path", ""))
            if kind == "Transformer":
                st = _read_json(path, "sentence_bert_config.json") or {}
                max_len = st.get("max_seq_length")
                lowercase = bool(st.get("do_lower_case", False))
            elif kind == "Pooling":
                modes = _pooling_modes(_read_json(path, "config.json") or {}, default_mode)
            elif kind == "Normalize":
                normalize = True
            else:  # a Dense projection etc. would change the vectors: refuse, don't ignore
                from asgl.engine.contracts.errors import ModelLoadError
                raise ModelLoadError(f"{model_dir}: sentence-transformers module {kind!r} "
                                     "is not supported")
        return cls(modes=modes, normalize=normalize,
                   max_seq_length=int(max_len) if max_len else None, lowercase=lowercase,
                   **common)

    def check_dimensions(self, dimensions: Optional[int]) -> Optional[int]:
        """The output size to truncate to (None: full), or InvalidRequest."""
        if dimensions is None or dimensions == self.dim:
            return None
        if type(dimensions) is not int or not 0 < dimensions < self.dim:
            raise InvalidRequest(f"dimensions must be an integer in [1, {self.dim}], got "
                                 f"{dimensions!r}", "dimensions")
        if not self.matryoshka:
            raise InvalidRequest(f"this model gives {self.dim}-dimensional embeddings and was "
                                 "not trained for shorter ones (Matryoshka): leave dimensions "
                                 f"unset or {self.dim}", "dimensions")
        if self.matryoshka_dims and dimensions not in self.matryoshka_dims:
            raise InvalidRequest(f"dimensions must be one of {list(self.matryoshka_dims)}",
                                 "dimensions")
        return dimensions


def _pooling_modes(cfg: dict, default_mode: str) -> tuple[str, ...]:
    mode = cfg.get("pooling_mode")
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(name for flag, name in _LEGACY_FLAGS.items() if cfg.get(flag))
    modes = modes or (default_mode,)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        from asgl.engine.contracts.errors import ModelLoadError
        raise ModelLoadError(f"pooling mode {bad[0]!r} is not supported")
    return modes


def _read_json(directory: str, name: str) -> Any:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- embedder
@dataclass
class _Item:
    ids: list[int]
    dims: Optional[int]
    future: asyncio.Future = field(repr=False)


def encoder_attention_backend(cfg: EngineConfig, on_cuda: bool) -> str:
    """A backend that runs without a KV pool: flashinfer's paged kernels need one."""
    name = cfg.attention_backend or ("triton" if on_cuda else "torch")
    return "triton" if name == "flashinfer" else name


class Embedder:
    def __init__(self, runner: Any, pooling: PoolingConfig, tokenizer: Any, worker: Any,
                 cfg: EngineConfig):
        self.runner, self.pooling, self.tokenizer, self.worker = runner, pooling, tokenizer, worker
        self.vocab_size = int(runner.vocab_size)
        context = cfg.context_length or pooling.max_seq_length or \
            getattr(runner.hf_config, "max_position_embeddings", 512)
        limit = getattr(runner.model, "max_positions", None)  # learned positions end there
        if limit is not None and context > limit:
            logger.warning("context length %d exceeds the model's %d positions: capped",
                           context, limit)
            context = limit
        self.context_len = int(context)
        self.max_batch_tokens = max(cfg.max_prefill_tokens, self.context_len)
        self.max_batch_size = cfg.max_running_requests or 256
        self._queue: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._running = 0
        self._task = asyncio.get_running_loop().create_task(self._run(), name="asgl-embedder")

    @classmethod
    async def create(cls, cfg: EngineConfig, source: Any, tokenizer: Any,
                     worker: Any) -> "Embedder":
        """Load the model on the worker (with an encoder-capable attention backend)."""
        from asgl.engine.worker.model_runner import ModelRunner, resolve_device

        on_cuda = resolve_device(cfg).type == "cuda"
        runner_cfg = cfg.replace(attention_backend=encoder_attention_backend(cfg, on_cuda))
        runner = await worker.run(ModelRunner, runner_cfg, source)
        if hasattr(runner.model, "sep_token_id") and tokenizer is not None and \
                tokenizer.sep_token_id is not None:  # a cross-encoder's token types
            runner.model.sep_token_id = tokenizer.sep_token_id
        model_dir = source.model_path if os.path.isdir(source.model_path) else None
        pooling = PoolingConfig.discover(model_dir, source.hf_config,
                                         getattr(runner.model, "default_pooling", "lasttoken"))
        logger.info("embeddings: pooling %s, normalize %s, %d dimensions",
                    "+".join(pooling.modes), pooling.normalize, pooling.dim)
        return cls(runner, pooling, tokenizer, worker, cfg)

    # ------------------------------------------------------------------ API (event loop)
    async def embed(self, inputs: EmbedInput, *, truncate: bool = False,
                    dimensions: Optional[int] = None
                    ) -> Union[EmbeddingOutput, list[EmbeddingOutput]]:
        """One output for a text or one token-id list; a list of outputs for a list of them.
        Every input is checked before any is queued: a bad one fails the whole call."""
        if self._closing:
            from asgl.engine.contracts.errors import EngineNotRunning
            raise EngineNotRunning("the engine is shutting down")
        dims = self.pooling.check_dimensions(dimensions)
        texts, id_lists, single = _split_inputs(inputs)
        if texts is not None:
            id_lists = await self._tokenize(texts, truncate)
        else:
            id_lists = [self._check_ids(ids, k, truncate) for k, ids in enumerate(id_lists)]
        for k, ids in enumerate(id_lists):
            if len(ids) > self.context_len:
                raise InvalidRequest(f"input[{k}] has {len(ids)} tokens, more than the context "
                                     f"length of {self.context_len}; pass truncate=true to cut "
                                     "it", "input")
        loop = asyncio.get_running_loop()
        items = [_Item(ids, dims, loop.create_future()) for ids in id_lists]
        self._queue.extend(items)
        self._wake.set()
        try:
            vectors = await asyncio.gather(*(it.future for it in items))
        finally:
            for it in items:  # cancelled caller: queued inputs are skipped, not computed
                it.future.cancel()
        outs = [EmbeddingOutput(index=k, embedding=v, prompt_tokens=len(ids))
                for k, (v, ids) in enumerate(zip(vectors, id_lists))]
        return outs[0] if single else outs

    def memory_state(self) -> dict:
        """Engine.memory_state's shape: no KV pool, so capacity 0."""
        return {"capacity": 0, "free": 0, "cached": 0, "running": self._running,
                "waiting": self.num_waiting}

    @property
    def num_waiting(self) -> int:
        """Queued inputs whose callers still wait."""
        return sum(not it.future.done() for it in self._queue)

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._task, timeout=30)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._task.cancel()

    # ------------------------------------------------------------------ inputs
    async def _tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        if self.tokenizer is None:
            raise InvalidRequest("this engine has no tokenizer: send token ids", "input")
        for k, text in enumerate(texts):
            if not text:
                raise InvalidRequest(f"input[{k}] is an empty string", "input")
        if self.pooling.lowercase:
            texts = [t.lower() for t in texts]
        if sum(map(len, texts)) <= _OFFLOAD_CHARS:
            return self._encode(texts, truncate)
        return await asyncio.get_running_loop().run_in_executor(None, self._encode, texts,
                                                                truncate)

    def _encode(self, texts: list[str], truncate: bool) -> list[list[int]]:
        if truncate:
            return self.tokenizer(texts, truncation=True, max_length=self.context_len)["input_ids"]
        return self.tokenizer(texts)["input_ids"]

    def _check_ids(self, ids: list[int], k: int, truncate: bool) -> list[int]:
        if not ids:
            raise InvalidRequest(f"input[{k}] is an empty list of token ids", "input")
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise InvalidRequest(f"input[{k}] has token id {t}, outside the vocabulary of "
                                     f"{self.vocab_size} tokens", "input")
        return ids[:self.context_len] if truncate else ids

    # ------------------------------------------------------------------ batching (event loop)
    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._closing:
                self._fail_queued()
                return
            items = self._take_batch()
            if not items:
                continue
            self._running = len(items)
            try:
                vectors = await self.worker.run(encode_batch, self.runner, self.pooling.modes,
                                                self.pooling.normalize, [it.ids for it in items],
                                                [it.dims for it in items])
            except Exception:  # a bug or an OOM must not hang the callers
                logger.exception("embedding forward failed for %d inputs", len(items))
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(RuntimeError("embedding forward failed"))
                continue
            finally:
                self._running = 0
            for it, vec in zip(items, vectors):
                if not it.future.done():
                    it.future.set_result(vec)

    def _take_batch(self) -> list[_Item]:
        items: list[_Item] = []
        tokens = 0
        while self._queue and len(items) < self.max_batch_size:
            it = self._queue[0]
            if it.future.done():  # its caller went away
                self._queue.popleft()
                continue
            if items and tokens + len(it.ids) > self.max_batch_tokens:
                break
            items.append(self._queue.popleft())
            tokens += len(it.ids)
        return items

    def _fail_queued(self) -> None:
        from asgl.engine.contracts.errors import EngineNotRunning

        while self._queue:
            it = self._queue.popleft()
            if not it.future.done():
                it.future.set_exception(EngineNotRunning("the engine shut down"))


def _split_inputs(inputs: Any) -> tuple[Optional[list[str]], Optional[list[list[int]]], bool]:
    """(texts, token-id lists, single): exactly one of the first two is set."""
    if isinstance(inputs, str):
        return [inputs], None, True
    if not isinstance(inputs, (list, tuple)):
        raise InvalidRequest("input must be a string, a list of strings, a list of token ids "
                             f"or a list of such lists, not {type(inputs).__name__}", "input")
    if not inputs:
        raise InvalidRequest("input must not be an empty list", "input")
    if all(isinstance(x, str) for x in inputs):
        return list(inputs), None, False
    if all(type(x) is int for x in inputs):
        return None, [list(inputs)], True
    if all(isinstance(x, (list, tuple)) and all(type(t) is int for t in x) for x in inputs):
        return None, [list(x) for x in inputs], False
    raise InvalidRequest("input must be a string, a list of strings, a list of token ids or a "
                         "list of such lists (not a mix)", "input")
