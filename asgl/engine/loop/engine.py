"""Engine: the async in-process API.

    engine = Engine(model_path=None)          # the embedded SmolLM2 by default
    await engine.start()
    out = await engine.generate("Hello", SamplingParams(max_new_tokens=16))
    async for chunk in engine.generate_stream("Hello", {"temperature": 0}):
        print(chunk.text, end="")
    await engine.shutdown()

Thread model (docs/architecture.md): everything here runs on the event loop, which
tokenizes, schedules, applies results, detokenizes and streams; the `DeviceWorker` thread
runs `ModelRunner.step`. With overlap on, step N+1 is scheduled and submitted before step
N's results are applied, so the device never waits for this Python.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional, Union

import msgspec

from asgl.config import EngineConfig
from asgl.engine.scheduler.memory import KVMemory
from asgl.engine.loop.output_processor import (apply_step_output, fail_request, finish_aborted,
                                               finish_request)
from asgl.engine.contracts.outputs import FinishReason, GenerateOutput, StreamChunk
from asgl.engine.loop import offload
from asgl.engine.loop.streams import RequestStream
from asgl.engine.contracts.step import StepPlan
from asgl.engine.sampling.batch import SamplingBatch
from asgl.engine.scheduler.req import Req
from asgl.engine.contracts.errors import EngineNotRunning, InvalidRequest, ModelLoadError
from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.engine.scheduler.scheduler import NEED_DRAIN, ScheduledBatch, Scheduler
from asgl.engine.worker.device_worker import DeviceWorker

if TYPE_CHECKING:
    from asgl.engine.loop.embedder import EmbeddingOutput

logger = logging.getLogger(__name__)

PromptType = Union[str, list[int], None]
LOG_INTERVAL_S = 10.0
# Tokenizing this many characters can take milliseconds: do it off the loop.
_OFFLOAD_TOKENIZE_CHARS = 4096


class Engine:
    # Constrained decoding (regex / json_schema / ebnf / structural_tag, grammar.py); False
    # once started with --grammar-backend none or without a tokenizer.
    supports_grammar = True

    def __init__(self, config: Optional[EngineConfig] = None, **options: Any):
        self.config = config.replace(**options) if config is not None else EngineConfig(**options)
        self._started = False
        self._closing = False
        self._streams: dict[str, RequestStream] = {}
        self._wake: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        self._last_log = (time.monotonic(), 0)  # (when, generated tokens then)
        self.embedder = None  # an embedding engine's Embedder (is_embedding)
        self.grammar_backend = None  # GrammarBackend (asgl/engine/grammar.py)
        self._jump_forward = None  # JumpForward (asgl/engine/jump_forward.py)
        self._grammar_step = None  # the submitted step's masks, filled after the next apply
        self._progress = 0  # steps applied (or failed): what the watchdog watches
        self.watchdog = None  # Watchdog (asgl/engine/loop/watchdog.py) unless turned off
        self.images = None  # ImageInputs (engine/loop/mm_inputs.py) of a vision-language model

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> "Engine":
        if self._started:
            return self
        from asgl.engine.worker.tp import create_model_runner
        from asgl.engine.loop.tokenizer import load_tokenizer, resolve_chat_template
        from asgl.models.loader import resolve_model

        cfg = self.config
        loop = asyncio.get_running_loop()
        self.worker = DeviceWorker()
        self.source = await loop.run_in_executor(None, resolve_model, cfg)
        self.tokenizer = None
        if not cfg.skip_tokenizer_init:
            self.tokenizer = await loop.run_in_executor(None, load_tokenizer, self.source,
                                                        cfg.trust_remote_code)
        if cfg.is_embedding:
            return await self._start_embedding()
        # tp_size > 1: a TPModelRunner that also drives the other ranks (asgl/engine/tp.py)
        # a vision-language model's image front (before the ranks start: it may refuse)
        self.images = await loop.run_in_executor(None, _image_inputs, cfg, self.source)
        self.runner = await self.worker.run(create_model_runner, cfg, self.source)
        hf = self.source.hf_config
        if self.images is not None and self.images.image_token_id is None:
            # LLaVA-repo layout: no image token in the vocabulary; one is added (its id is
            # past the model's vocabulary, and image rows never reach the embedding)
            self.images.add_image_token(self.tokenizer, self.runner.vocab_size)
        on_cpu = self.runner.device.type == "cpu"
        max_running = cfg.max_running_requests or (64 if on_cpu else 1024)
        text_hf = hf.get_text_config() if hasattr(hf, "get_text_config") else hf  # (VLMs)
        context_len = cfg.context_length or getattr(text_hf, "max_position_embeddings", 4096)
        capacity = self.runner.kv_capacity()
        if not cfg.max_total_tokens:
            # more than every running request at full context could never be used
            capacity = min(capacity, max_running * context_len)
        if context_len > capacity:
            logger.warning("context length %d exceeds the KV pool (%d tokens): capped",
                           context_len, capacity)
            context_len = capacity
        self.context_len = context_len
        await self.worker.run(self.runner.init_memory, capacity, max_running, context_len)
        chunk = cfg.chunked_prefill_size or (2048 if on_cpu else 8192)
        self._memory_args = dict(capacity=capacity, max_running=max_running, on_cpu=on_cpu,
                                 chunk=context_len if chunk == -1 else chunk)
        self.vocab_size = self.runner.vocab_size
        self._init_memory_state()
        self.overlap = not cfg.disable_overlap_schedule
        self.eos_ids = frozenset(self.source.eos_token_ids or ())
        self.chat_template = resolve_chat_template(cfg.chat_template, self.source)
        await self._start_grammar()
        self._seed_rng = random.Random(cfg.random_seed)
        self._wake = asyncio.Event()
        self._loop_task = loop.create_task(self._run_loop(), name="asgl-scheduler")
        self._started = True
        self._start_watchdog()
        # The model, graphs and tables live as long as the engine: keep the cyclic GC from
        # walking them at every full collection (a pause of milliseconds mid-step).
        gc.collect()
        gc.freeze()
        logger.info("KV pool: %d tokens; context %d; max running %d; chunk %d; overlap %s",
                    capacity, context_len, max_running, self._memory_args["chunk"], self.overlap)
        return self

    def _start_watchdog(self) -> None:
        if not self.config.watchdog_timeout:
            return
        from asgl.engine.loop.watchdog import Watchdog

        loop_thread = threading.current_thread().name

        def where() -> str:
            busy = self.worker.describe_busy()
            if busy is not None:
                return f"the device worker is stuck: {busy}"
            return f"the event loop (thread {loop_thread}) is stuck in the scheduler or a handler"

        self.watchdog = Watchdog(self.config.watchdog_timeout, progress=lambda: self._progress,
                                 has_work=lambda: self.scheduler.has_work(), where=where,
                                 exit_on_stall=self.config.exit_on_stall).start()

    @property
    def stalled(self) -> Optional[str]:
        """What is stuck while the watchdog finds no progress with work queued, else None."""
        return self.watchdog.stalled if self.watchdog is not None else None

    def _init_memory_state(self) -> None:
        """(Re)create the KV memory bookkeeping (table, slots, prefix cache) and scheduler."""
        cfg, m = self.config, self._memory_args
        self.memory = KVMemory(m["capacity"], m["max_running"], self.context_len,
                               # other TP ranks replay the writes on their copy
                               track_writes=not m["on_cpu"] or cfg.tp_size > 1,
                               disable_cache=cfg.disable_radix_cache)
        self.scheduler = Scheduler(
            memory=self.memory, max_running=m["max_running"], chunk_size=m["chunk"],
            max_prefill_tokens=max(cfg.max_prefill_tokens, m["chunk"]),
            context_len=self.context_len, policy=cfg.schedule_policy,
            check_integrity=cfg.debug_check_integrity, seed=cfg.random_seed or 0,
            vocab_size=self.vocab_size)
        self.scheduler.jump_forward = self._jump_forward

    async def _start_grammar(self) -> None:
        """The xgrammar backend (--grammar-backend) and jump-forward (--disable-jump-forward)."""
        cfg = self.config
        if cfg.grammar_backend == "none" or self.tokenizer is None:
            self.supports_grammar = False
            return
        try:
            from asgl.engine.grammar.backend import GrammarBackend
            from asgl.engine.loop.jump_forward import MIN_JUMP_CHARS_OVERLAP, JumpForward

            self.grammar_backend = await asyncio.get_running_loop().run_in_executor(
                None, GrammarBackend, self.tokenizer, self.vocab_size, sorted(self.eos_ids))
        except Exception as e:  # xgrammar missing, or a tokenizer it cannot read
            logger.warning("constrained decoding is off: xgrammar failed to start (%s)", e)
            self.supports_grammar = False
            return
        if self.overlap:  # a jump costs a request one step then: only long ones pay off
            self.grammar_backend.min_jump_chars = MIN_JUMP_CHARS_OVERLAP
        if not cfg.disable_jump_forward:
            self._jump_forward = JumpForward(self.tokenizer, self.grammar_backend,
                                             self.context_len)
            self.scheduler.jump_forward = self._jump_forward

    async def _start_embedding(self) -> "Engine":
        """Embedding engines: no KV pool and no scheduler loop; an Embedder batches encoder
        forwards on the worker (asgl/engine/embedder.py)."""
        from asgl.engine.loop.embedder import Embedder

        self.embedder = await Embedder.create(self.config, self.source, self.tokenizer,
                                              self.worker)
        self.runner = self.embedder.runner
        self.context_len = self.embedder.context_len
        self.vocab_size = self.embedder.vocab_size
        self.eos_ids = frozenset(self.source.eos_token_ids or ())
        self.chat_template = None
        self._wake = asyncio.Event()
        self._started = True
        return self

    async def shutdown(self) -> None:
        if not self._started:
            return
        self._closing = True
        if self.watchdog is not None:
            self.watchdog.stop()
        for rid in list(self._streams):
            self.abort(rid)
        self._wake.set()
        if self.embedder is not None:
            await self.embedder.close()
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(self._loop_task, timeout=30)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._loop_task.cancel()
        close = getattr(self.runner, "close", None)  # TP: stops the other ranks
        if close is not None:
            await self.worker.run(close)
        # Drop the weights, KV pool and graphs now, so another engine in this process
        # (benchmarks compare two configurations) gets the device memory back.
        self.runner = None
        await self.worker.run(_release_device_memory)
        self.worker.shutdown()
        if self.grammar_backend is not None:
            self.grammar_backend.shutdown()
        if self.images is not None:
            self.images.shutdown()
        self._started = False

    async def __aenter__(self) -> "Engine":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt: PromptType = None,
                       sampling_params: Union[SamplingParams, dict, None] = None, *,
                       input_ids: Optional[list[int]] = None, rid: Optional[str] = None,
                       return_logprob: bool = False, logprob_start_len: int = -1,
                       top_logprobs_num: int = 0, image_data: Optional[list] = None,
                       mm_inputs: Any = None) -> Union[GenerateOutput, list[GenerateOutput]]:
        """Generate to completion. With n > 1 in the sampling params, a list of n outputs.
        `image_data`: encoded images (or PIL images), one per image placeholder of the
        prompt; `mm_inputs`: what `prepare_images` made of them (the ids given expanded)."""
        # collect: the stream folds deltas itself and wakes us once per finished choice
        stream = await self._submit(prompt, sampling_params, input_ids, rid, return_logprob,
                                    logprob_start_len, top_logprobs_num, collect=True,
                                    image_data=image_data, mm_inputs=mm_inputs)
        try:
            while not stream.done:
                await stream.next_chunks()
        finally:
            if not stream.done:
                self.abort(stream.rid)
            self._streams.pop(stream.rid, None)
        outs = [self._final_output(stream, i, "".join(stream.texts[i]), stream.ids[i],
                                   stream.reasons[i]) for i in range(stream.n)]
        return outs[0] if stream.n == 1 else outs

    async def generate_stream(self, prompt: PromptType = None,
                              sampling_params: Union[SamplingParams, dict, None] = None, *,
                              input_ids: Optional[list[int]] = None, rid: Optional[str] = None,
                              return_logprob: bool = False, logprob_start_len: int = -1,
                              top_logprobs_num: int = 0, image_data: Optional[list] = None,
                              mm_inputs: Any = None) -> AsyncIterator[StreamChunk]:
        """Yield StreamChunks (deltas) as tokens are produced; the last one has finished=True
        for each of the n choices. Leaving the loop early aborts the request."""
        stream = await self._submit(prompt, sampling_params, input_ids, rid, return_logprob,
                                    logprob_start_len, top_logprobs_num,
                                    image_data=image_data, mm_inputs=mm_inputs)
        try:
            while True:
                for chunk in await stream.next_chunks():
                    yield chunk
                if stream.done and not stream.has_chunks:
                    break
        finally:
            if not stream.done:
                self.abort(stream.rid)
            self._streams.pop(stream.rid, None)

    async def generate_into(self, deliver: Callable[[StreamChunk], None],
                            prompt: PromptType = None,
                            sampling_params: Union[SamplingParams, dict, None] = None, *,
                            input_ids: Optional[list[int]] = None, rid: Optional[str] = None,
                            return_logprob: bool = False, logprob_start_len: int = -1,
                            top_logprobs_num: int = 0, image_data: Optional[list] = None,
                            mm_inputs: Any = None) -> None:
        """Like generate_stream, but each chunk is handed to `deliver`, a plain function
        called on the event loop inside the step that produced it: no task wake-up per
        step, which is what a server streaming to hundreds of clients pays for. Returns
        once every choice has finished; an exception from `deliver` aborts this request
        (only) and is raised here; cancelling aborts too."""
        stream = await self._submit(prompt, sampling_params, input_ids, rid, return_logprob,
                                    logprob_start_len, top_logprobs_num,
                                    image_data=image_data, mm_inputs=mm_inputs)
        try:
            stream.attach(deliver)
            await stream.wait_delivered()
        finally:
            if not all(req.finished for req in stream.reqs):
                self.abort(stream.rid)
            self._streams.pop(stream.rid, None)

    def abort(self, rid: str) -> bool:
        """Abort a request; its KV memory is released within one step. False if unknown."""
        stream = self._streams.get(rid)
        if stream is None:
            return False
        for req in stream.reqs:
            if not req.finished:
                self.scheduler.abort(req)
                finish_aborted(req)
        self._wake.set()
        return True

    def abort_all(self) -> list[str]:
        """Abort every request in flight (SGLang's /abort_request abort_all); their ids."""
        rids = list(self._streams)
        return [rid for rid in rids if self.abort(rid)]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Rendered chat prompts already hold their special tokens:
        tokenize those with add_special_tokens=False."""
        if self.tokenizer is None:
            raise InvalidRequest("this engine has no tokenizer: send input_ids", "text")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def embed(self, inputs: Any, *, truncate: bool = False, dimensions: Optional[int] = None
                    ) -> Union["EmbeddingOutput", list["EmbeddingOutput"]]:
        """Embeddings of a text, a list of texts, a token-id list or a list of those (an
        engine started with is_embedding=True): one EmbeddingOutput for a single input, a
        list for a list. Inputs longer than the context are refused unless `truncate`;
        `dimensions` truncates Matryoshka models' vectors (then renormalizes)."""
        if not self._started or self._closing:
            raise EngineNotRunning("the engine is not running: call `await engine.start()`")
        if self.embedder is None:
            raise InvalidRequest("this engine serves a generative model: start it with "
                                 "is_embedding=True (--is-embedding) to embed", "model")
        return await self.embedder.embed(inputs, truncate=truncate, dimensions=dimensions)

    def flush_cache(self) -> bool:
        """Empty the prefix cache; refused (False) while requests hold cached prefixes."""
        return True if self.embedder is not None else self.memory.flush()

    # ------------------------------------------------------------------ internals
    async def _submit(self, prompt, sampling_params, input_ids, rid, return_logprob,
                      logprob_start_len, top_logprobs_num, collect: bool = False,
                      image_data: Optional[list] = None, mm_inputs: Any = None
                      ) -> RequestStream:
        if not self._started or self._closing:
            raise EngineNotRunning("the engine is not running: call `await engine.start()`")
        if self.embedder is not None:
            raise InvalidRequest("this engine serves an embedding model: it embeds "
                                 "(embed(), /v1/embeddings, /encode) and never generates", "model")
        sp = _as_sampling_params(sampling_params)
        sp.validate(self.vocab_size)
        compiled = await self._compile_grammar(sp)
        ids = await self._prompt_ids(prompt, input_ids)
        if image_data is not None:  # (the server prepares them itself: mm_inputs)
            ids, mm_inputs = await self.prepare_images(ids, image_data)
        cache_ids = mm_inputs.cache_ids(ids) if mm_inputs is not None else None
        if mm_inputs is not None and self.images.image_token_id >= self.vocab_size:
            # a LLaVA-repo checkpoint's image token has no logit row and no penalty slot
            if return_logprob and logprob_start_len >= 0:
                raise InvalidRequest("prompt logprobs over images are not supported for this "
                                     "checkpoint (its image token is outside the vocabulary)",
                                     "logprob_start_len")
            if sp.repetition_penalty != 1.0:
                raise InvalidRequest("repetition_penalty with images is not supported for "
                                     "this checkpoint (its image token is outside the "
                                     "vocabulary)", "repetition_penalty")
        if top_logprobs_num < 0 or top_logprobs_num > 20:
            raise InvalidRequest("top_logprobs_num must be in [0, 20]", "top_logprobs_num")
        if logprob_start_len >= len(ids):
            raise InvalidRequest(f"logprob_start_len {logprob_start_len} is not inside the "
                                 f"prompt of {len(ids)} tokens", "logprob_start_len")
        if rid is None:
            rid = uuid.uuid4().hex
        elif rid in self._streams:
            raise InvalidRequest(f"request id {rid!r} is already in use", "rid")
        max_new = self.context_len - len(ids)
        if sp.max_new_tokens is not None:
            max_new = min(max_new, sp.max_new_tokens)
        stream = RequestStream(rid, sp.n, collect=collect,
                               interval=self.config.stream_interval)
        detok_factory = self._detok_factory(sp)
        base_seed = sp.seed if sp.seed is not None else self._seed_rng.getrandbits(62)
        now = time.monotonic()
        for i in range(sp.n):
            req_sp = sp if sp.max_new_tokens == max_new else _replace(sp, max_new_tokens=max_new)
            req = Req(rid=rid if sp.n == 1 else f"{rid}-{i}", prompt_ids=ids, sampling=req_sp,
                      seed=(base_seed + i) % (1 << 63), eos_ids=self.eos_ids,
                      return_logprob=return_logprob,
                      logprob_start_len=logprob_start_len if return_logprob else -1,
                      top_logprobs_num=top_logprobs_num if return_logprob else 0,
                      arrival_time=now, mm=mm_inputs, cache_prompt_ids=cache_ids,
                      cache_namespace=_salt_namespace(sp.cache_salt))
            req.sink, req.sink_index = stream, i
            req.detok = detok_factory(ids) if detok_factory else None
            if compiled is not None:  # jump-forward tokens carry no logprobs
                req.grammar = self.grammar_backend.new_state(
                    compiled, jump_forward=self._jump_forward is not None and not return_logprob)
            stream.reqs.append(req)
        self._streams[rid] = stream
        if max_new == 0 and not return_logprob:
            for req in stream.reqs:
                req.finish_reason = _length()
                finish_aborted(req)  # tells the consumer it ended, like an abort does
            return stream
        for req in stream.reqs:
            g = req.grammar
            if g is not None and g.min_jump and g.jump_string():
                self._jump_forward(req)  # the forced start joins the prompt's prefill
                if req.finished:
                    continue
            self.scheduler.add(req)
        self._wake.set()
        return stream

    async def prepare_images(self, ids: list[int], images: list, param: str = "image_data",
                             names: Optional[list[str]] = None) -> tuple[list[int], Any]:
        """Decode and preprocess `images` off the loop and expand the prompt's image
        placeholders: (expanded ids, MMInputs). InvalidRequest for a bad image, or when this
        model takes no images."""
        if self.images is None:
            raise InvalidRequest("this model takes text only: images are not supported", param)
        ids, mm = await self.images.prepare(ids, images, param, names)
        if len(ids) >= self.context_len:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens with its images' "
                                 f"positions, but the context length is {self.context_len} "
                                 "(prompt + output)", param)
        return ids, mm

    async def _compile_grammar(self, sp: SamplingParams) -> Any:
        """The compiled grammar of `sp`'s constraint (compiled off the loop, cached), or
        None; InvalidRequest (before anything is queued) if it cannot be enforced."""
        from asgl.engine.grammar.specs import requested_grammar

        spec = requested_grammar(sp)
        if spec is None:
            return None
        if self.grammar_backend is None:
            raise InvalidRequest(f"constrained decoding ({spec[0]}) is off on this server "
                                 "(--grammar-backend none, or no tokenizer)", spec[0])
        return await self.grammar_backend.compile(*spec)

    async def _prompt_ids(self, prompt: PromptType, input_ids: Optional[list[int]]) -> list[int]:
        if input_ids is None and isinstance(prompt, list):
            prompt, input_ids = None, prompt
        if input_ids is not None:
            if prompt is not None:
                raise InvalidRequest("give either a text prompt or input_ids, not both", "text")
            ids = list(input_ids)
            extra = self.images.image_token_id if self.images is not None else -1
            bad = [t for t in ids if not isinstance(t, int) or t < 0
                   or (t >= self.vocab_size and t != extra)]
            if bad:
                raise InvalidRequest(f"input_ids contains {bad[0]!r}, outside the vocabulary "
                                     f"of {self.vocab_size} tokens", "input_ids")
        elif isinstance(prompt, str):
            if len(prompt) > _OFFLOAD_TOKENIZE_CHARS:
                try:
                    ids = await offload.run_bounded(self.tokenize, prompt)
                except asyncio.TimeoutError:
                    raise InvalidRequest(f"tokenizing the prompt took longer than "
                                         f"{offload.TOKENIZE_TIMEOUT_S:.0f} s", "text") from None
            else:
                ids = self.tokenize(prompt)
        else:
            raise InvalidRequest("a prompt (text or input_ids) is required", "text")
        if not ids:
            raise InvalidRequest("the prompt is empty", "text")
        if len(ids) >= self.context_len:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens, but the context length is "
                                 f"{self.context_len} (prompt + output)", "text")
        return ids

    def _detok_factory(self, sp: SamplingParams):
        if self.tokenizer is None:
            if sp.stop_regex:
                raise InvalidRequest("stop_regex matches text: this engine has no tokenizer",
                                     "stop_regex")
            return None
        from asgl.engine.loop.detokenizer import IncrementalDetokenizer
        from asgl.engine.loop.stop_regex import RegexStopDetokenizer, compile_stop_regexes

        pattern = compile_stop_regexes(sp.stop_regexes) if sp.stop_regex else None

        def make(prompt_ids: list[int]):
            detok = IncrementalDetokenizer(
                self.tokenizer, prompt_ids, skip_special_tokens=sp.skip_special_tokens,
                spaces_between_special_tokens=sp.spaces_between_special_tokens,
                stop_strings=sp.stop_strings, no_stop_trim=sp.no_stop_trim)
            if pattern is not None:
                detok = RegexStopDetokenizer(detok, pattern, sp.no_stop_trim)
            return detok
        return make

    def _final_output(self, stream: RequestStream, i: int, text: str, ids: list[int],
                      reason: Optional[dict]) -> GenerateOutput:
        req = stream.reqs[i]
        out = GenerateOutput(rid=req.rid, index=i, text=text, output_ids=ids,
                             finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                             completion_tokens=len(ids), cached_tokens=req.num_cached)
        if req.return_logprob:
            out.output_token_logprobs = list(req.output_logprobs)
            out.output_top_logprobs = list(req.output_top_logprobs) if req.top_logprobs_num else None
            out.input_token_logprobs, out.input_top_logprobs = req.input_logprobs()
        return out

    # ------------------------------------------------------------------ the step loop
    async def _run_loop(self) -> None:
        inflight: Optional[tuple[ScheduledBatch, asyncio.Future]] = None
        sched = self.scheduler
        while True:
            if inflight is None and not sched.has_work():
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                batch = sched.schedule(allow_retract=inflight is None)
                future = None
                if batch is not None and batch is not NEED_DRAIN:
                    future = self._submit_step(batch)
                try:
                    if inflight is not None:
                        # Consumers woken by the previous apply run here, while the GPU works
                        # on the steps in flight: not between an apply and the next launch.
                        await asyncio.sleep(0)
                        self._apply(inflight[0], await self._finish(inflight[1]))
                        inflight = None
                finally:
                    # grammar masks of the step just submitted need the tokens applied
                    # above; its sampler waits for them (also when the apply failed)
                    self._fill_grammar()
                if future is not None:
                    if self.overlap:
                        inflight = (batch, future)
                    else:
                        self._apply(batch, await self._finish(future))
                elif batch is None and sched.has_work():
                    # nothing can run now (e.g. waiting for memory): don't spin
                    await asyncio.sleep(0.002)
            except Exception:  # a bug here must not hang every waiting request
                logger.exception("scheduler step failed; aborting all requests")
                self._progress += 1  # (a failure is progress too: the work is gone)
                try:
                    self._fail_all()
                except Exception:  # noqa: BLE001 - keep the loop alive whatever happens
                    logger.exception("resetting after a failed step failed too")
                sched = self.scheduler  # _fail_all made a new one: the old keeps the failed work
                inflight = None
            if inflight is None:  # (with a step in flight the next iteration yields above)
                self._maybe_log_stats()
                await asyncio.sleep(0)  # let HTTP handlers and streams run

    def _maybe_log_stats(self) -> None:
        """One line every LOG_INTERVAL_S while busy: load, memory, cache hits, throughput."""
        now = time.monotonic()
        last = self._last_log
        if now - last[0] < LOG_INTERVAL_S:
            return
        stats = self.scheduler.stats
        rate = (stats.generated_tokens - last[1]) / (now - last[0])
        self._last_log = (now, stats.generated_tokens)
        used = 1 - self.memory.available() / self.memory.capacity
        hit = stats.cached_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0
        logger.info("running %d, waiting %d, KV used %.1f%% (cached %d tokens), prefix-cache "
                    "hit rate %.1f%%, generation %.1f tok/s", len(self.scheduler.running),
                    len(self.scheduler.waiting), used * 100, self.memory.cached_tokens(), hit * 100,
                    rate)

    def _submit_step(self, batch: ScheduledBatch) -> asyncio.Future:
        """Hand the worker this step's host-side plan (no device tensor is made here)."""
        sampling = None
        if batch.sampling_reqs:
            sampling = SamplingBatch.from_running(
                self.scheduler.running_set, batch.sample_table_rows, batch.sample_steps,
                batch.sampling_reqs)
            if self.grammar_backend is not None:
                sampling.grammar = self._grammar_step = self.grammar_backend.step(
                    batch.sampling_reqs, pinned=not self._memory_args["on_cpu"])
        plan = StepPlan(forward=batch.forward, sampling=sampling,
                        table_writes=self.memory.take_table_writes(),
                        req_to_token=self.memory.req_to_token)
        return self.worker.run(self.runner.step, plan)

    def _fill_grammar(self) -> None:
        step, self._grammar_step = self._grammar_step, None
        if step is None:
            return
        for req, reason in step.fill():  # grammar complete, or nothing allowed
            try:
                finish_request(req, reason)
            except Exception as exc:  # noqa: BLE001 - its detokenizer failed: its fault only
                fail_request(req, f"this request failed: {type(exc).__name__}", exc)

    async def _finish(self, future: asyncio.Future):
        """A step's output; on the GPU the worker returns once the step is launched, and
        its host results are waited for on the worker's waiter thread, off the loop."""
        out = await future
        if out.wait is not None:
            out = await self.worker.finish(out.wait)
        return out

    def _apply(self, batch: ScheduledBatch, out) -> None:
        self._progress += 1
        apply_step_output(batch, out, self.context_len)
        self.scheduler.finish_step(batch)

    def _fail_all(self) -> None:
        for stream in list(self._streams.values()):
            for req in stream.reqs:
                if not req.finished:
                    req.finish_reason = _abort("internal error")
                    finish_aborted(req)
        # Start over with empty memory so that new requests can still be served.
        self._init_memory_state()

    # ------------------------------------------------------------------ introspection
    def grammar_cache_info(self) -> Optional[dict]:
        """Entries and bytes of the compiled-grammar cache (and its bounds)."""
        return self.grammar_backend.cache_info() if self.grammar_backend is not None else None

    def memory_state(self) -> dict:
        if self.embedder is not None:
            return self.embedder.memory_state()
        return {"capacity": self.memory.capacity, "free": self.memory.available(),
                "cached": self.memory.cached_tokens(), "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting)}


def _image_inputs(cfg: EngineConfig, source: Any) -> Any:
    """The image front (engine/loop/mm_inputs.py) of a vision-language model, else None."""
    from asgl.engine.loop.mm_inputs import ImageInputs
    from asgl.models.registry import get_model_class

    if cfg.is_embedding or cfg.model_impl == "transformers":
        return None
    arch = list(getattr(source.hf_config, "architectures", None) or [])
    try:
        cls = get_model_class(arch)
    except ValueError:  # no native file: transformers' code serves it (text only), or the
        return None     # model runner reports the architecture
    images = ImageInputs.for_model(cls, source.hf_config,
                                   source.weights_dir or source.model_path, cfg)
    if images is not None and cfg.tp_size > 1:
        images.shutdown()
        # the step broadcast to the other ranks carries token ids, not image features
        raise ModelLoadError(f"{arch[0]} is a vision-language model: it runs on one rank "
                             "(--tp 1) for now")
    return images


def _salt_namespace(salt: Optional[str]) -> Optional[str]:
    """The prefix-cache namespace of a cache_salt: salted requests share cached KV only
    with requests of the same salt (and never with unsalted ones)."""
    return None if salt is None else f"cache_salt:{salt}"


def _release_device_memory() -> None:
    import torch
    gc.unfreeze()  # what the engine froze at start may be garbage now
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _as_sampling_params(sp: Union[SamplingParams, dict, None]) -> SamplingParams:
    if sp is None:
        return SamplingParams()
    if isinstance(sp, SamplingParams):
        return sp
    if isinstance(sp, dict):
        try:
            return msgspec.convert(sp, SamplingParams, strict=False)
        except msgspec.ValidationError as e:
            raise InvalidRequest(f"invalid sampling_params: {e}", "sampling_params") from None
    raise InvalidRequest("sampling_params must be an object", "sampling_params")


def _replace(sp: SamplingParams, **changes: Any) -> SamplingParams:
    return msgspec.structs.replace(sp, **changes)


def _length():
    return FinishReason("length")


def _abort(message: str):
    return FinishReason("abort", message=message)
