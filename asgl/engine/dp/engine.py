"""`--dp N`: N engine replicas (processes) behind one server, with cache-aware routing.

`DPEngine` has the `Engine` API the server uses (generate, generate_stream, abort,
tokenize, memory_state, flush_cache, a scheduler view for metrics), so `build_app` serves it
unchanged. It tokenizes (the server already sends token ids), picks a replica with
`CacheAwareRouter` (longest cached prefix, balanced against load), and relays the
replica's stream chunks. Each replica is `python -m asgl.engine.dp.replica`: a whole
`Engine` with its own scheduler, radix cache and device worker (and, with `--tp`, its own
rank processes). On GPUs replica i sees only its GPUs (CUDA_VISIBLE_DEVICES).

Per-replica prefix-cache hit rates (prompt tokens the replica served from its cache) are in
`dp_stats()`, `memory_state()["dp"]` (so in /get_server_info) and in a log line at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional, Union

import msgspec
import torch

from asgl.config import EngineConfig
from asgl.engine.dp.ipc import (Abort, Chunk, Failed, Flush, Flushed, FrameReader, FrameWriter,
                                Hello, Load, ReplicaBoot, Submit, ToFront)
from asgl.engine.dp.router import CacheAwareRouter
from asgl.engine.contracts.errors import EngineNotRunning
from asgl.engine.loop.engine import _as_sampling_params
from asgl.engine.contracts.outputs import GenerateOutput, StreamChunk
from asgl.engine.contracts.errors import InvalidRequest
from asgl.engine.scheduler.scheduler import SchedulerStats

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 600.0
PromptType = Union[str, list[int], None]


def prefix_output(src: Any, prefix: bytes, dst: Any = None, redraws: bool = True) -> None:
    """Copy a replica's output to ours with `prefix` at the start of every line, so the
    replicas' logs, warnings and tracebacks stay readable side by side. A progress bar's
    redraws end in `\r`: kept (prefixed) when `redraws`, else dropped, so only one replica
    draws live bars and the others show each bar's final line."""
    dst = dst or sys.stderr.buffer
    pending = b""
    for chunk in iter(lambda: src.read1(1 << 16), b""):
        pending += chunk
        out = []
        *done, pending = _LINE_ENDS.split(pending)
        for text, end in zip(done[::2], done[1::2]):
            if end == b"\n" or redraws:
                out.append(prefix + text + end)
        dst.write(b"".join(out))
        dst.flush()
    if pending:
        dst.write(prefix + pending)
        dst.flush()


_LINE_ENDS = re.compile(rb"(\r|\n)")


class _Replica:
    def __init__(self, index: int, proc: subprocess.Popen):
        self.index = index
        self.proc = proc
        self.out: Optional[FrameWriter] = None
        self.hello: Optional[Hello] = None
        self.load: Optional[Load] = None
        self.ready = asyncio.Event()
        self.prompt_tokens = 0  # as the replica reported per request (first chunk)
        self.cached_tokens = 0


class _SchedulerView:
    """What metrics and admission read from `engine.scheduler`, summed over replicas
    (from their last load reports)."""

    def __init__(self, dp: "DPEngine"):
        self._dp = dp

    @property
    def running(self) -> range:  # sized like the engine's list; only len() is read
        return range(sum(r.load.running for r in self._dp._loads()))

    @property
    def waiting(self) -> range:
        return range(sum(r.load.waiting for r in self._dp._loads()))

    @property
    def stats(self) -> SchedulerStats:
        stats = SchedulerStats()
        for r in self._dp._loads():
            stats.num_steps += r.load.num_steps
            stats.prompt_tokens += r.load.prompt_tokens
            stats.cached_tokens += r.load.cached_tokens
            stats.generated_tokens += r.load.generated_tokens
            stats.num_retractions += r.load.num_retractions
        return stats


class DPEngine:
    supports_grammar = False  # until the replicas say (their Engine's)

    def __init__(self, config: Optional[EngineConfig] = None, **options: Any):
        self.config = config.replace(**options) if config is not None else EngineConfig(**options)
        self.replicas: list[_Replica] = []
        self.embedder = None
        self._requests: dict[str, tuple[_Replica, asyncio.Queue]] = {}
        self._token = secrets.token_hex(16)
        self._server: Optional[asyncio.base_events.Server] = None
        self._started = self._closing = False
        self.scheduler = _SchedulerView(self)

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> "DPEngine":
        if self._started:
            return self
        from asgl.engine.loop.tokenizer import load_tokenizer, resolve_chat_template
        from asgl.models.loader import resolve_model

        cfg = self.config
        if cfg.is_embedding:
            raise ValueError("--dp serves generative models only")
        loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        try:
            for i in range(cfg.dp_size):
                self.replicas.append(_Replica(i, self._spawn(i, port)))
            # The front's own metadata and tokenizer load while the replicas start.
            self.source = await loop.run_in_executor(None, resolve_model, cfg)
            self.tokenizer = None
            if not cfg.skip_tokenizer_init:
                self.tokenizer = await loop.run_in_executor(None, load_tokenizer, self.source,
                                                            cfg.trust_remote_code)
            self.chat_template = resolve_chat_template(cfg.chat_template, self.source)
            await self._wait_ready()
        except BaseException:
            await self._stop_replicas()
            raise
        hellos = [r.hello for r in self.replicas]
        self.context_len = min(h.context_len for h in hellos)
        self.vocab_size = hellos[0].vocab_size
        self.supports_grammar = all(h.supports_grammar for h in hellos)
        self.router = CacheAwareRouter([h.capacity for h in hellos])
        self._started = True
        logger.info("data parallel: %d replicas ready (pids %s)", len(hellos),
                    [h.pid for h in hellos])
        return self

    def _spawn(self, index: int, port: int) -> subprocess.Popen:
        cfg = self.config
        # Each replica's TP group (if any) meets in its own private file store.
        replica_cfg = cfg.replace(dp_size=1, dist_init_addr=None)
        env = dict(os.environ)
        threads = 0
        if torch.cuda.is_available() and cfg.device != "cpu":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            devices = visible.split(",") if visible else \
                [str(i) for i in range(torch.cuda.device_count())]
            need = cfg.dp_size * cfg.tp_size
            if len(devices) < need:
                raise ValueError(f"--dp {cfg.dp_size} x --tp {cfg.tp_size} needs {need} GPUs, "
                                 f"{len(devices)} visible")
            env["CUDA_VISIBLE_DEVICES"] = ",".join(
                devices[index * cfg.tp_size:(index + 1) * cfg.tp_size])
        else:  # split the cores: replicas run side by side
            threads = max(1, (os.cpu_count() or 1) // cfg.dp_size)
        boot = ReplicaBoot(config=replica_cfg, index=index, port=port, token=self._token,
                           threads=threads)
        proc = subprocess.Popen([sys.executable, "-m", "asgl.engine.dp.replica",
                                 "--parent-pid", str(os.getpid())], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        proc.stdin.write(msgspec.json.encode(boot))
        proc.stdin.close()
        # one live progress display: replica 0's bars stand for all of them
        threading.Thread(target=prefix_output, args=(proc.stdout, f"[DP{index}] ".encode()),
                         kwargs={"redraws": index == 0}, name=f"asgl-dp{index}-log",
                         daemon=True).start()
        return proc

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not all(r.ready.is_set() for r in self.replicas):
            dead = [r for r in self.replicas if r.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"data-parallel replica {dead[0].index} exited with code "
                                   f"{dead[0].proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"data-parallel replicas not ready in {_START_TIMEOUT_S} s")
            await asyncio.sleep(0.1)

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        inbox = FrameReader(reader, ToFront)
        hello = await inbox.recv()
        if (not isinstance(hello, Hello) or hello.token != self._token
                or not 0 <= hello.index < len(self.replicas)):
            writer.close()  # not one of ours
            return
        replica = self.replicas[hello.index]
        replica.out, replica.hello = FrameWriter(writer), hello
        replica.ready.set()
        try:
            while (msg := await inbox.recv()) is not None:
                self._dispatch(replica, msg)
        except msgspec.DecodeError as exc:
            logger.error("replica %d: connection failed: %s", replica.index, exc)
        if not self._closing:
            self._replica_lost(replica)

    def _dispatch(self, replica: _Replica, msg: Any) -> None:
        if isinstance(msg, (Chunk, Failed)):
            entry = self._requests.get(msg.rid)
            if entry is not None:
                entry[1].put_nowait(msg)
        elif isinstance(msg, Load):
            replica.load = msg
        elif isinstance(msg, Flushed) and not msg.ok:
            logger.warning("replica %d refused to flush its cache (requests running)",
                           replica.index)

    def _replica_lost(self, replica: _Replica) -> None:
        logger.error("data-parallel replica %d is gone (exit code %s): failing its requests",
                     replica.index, replica.proc.poll())
        if self._started:
            self.router.mark_dead(replica.index)
        for rid, (owner, queue) in list(self._requests.items()):
            if owner is replica:
                queue.put_nowait(Failed(rid, "the engine replica serving this request "
                                             "stopped", "error"))

    async def shutdown(self) -> None:
        if not self._started:
            return
        self._closing = True
        for rid in list(self._requests):
            self.abort(rid)
        logger.info("data parallel: %s", self._stats_line())
        await self._stop_replicas()
        self._started = False

    async def _stop_replicas(self) -> None:
        """Closing a replica's connection stops it; wait, then terminate stragglers."""
        self._closing = True
        for r in self.replicas:
            if r.out is not None:
                r.out.writer.close()
        loop = asyncio.get_running_loop()
        from asgl.engine.worker.tp_launch import stop_processes

        await loop.run_in_executor(None, stop_processes, [r.proc for r in self.replicas], 30.0)
        if self._server is not None:
            self._server.close()

    async def __aenter__(self) -> "DPEngine":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    # ------------------------------------------------------------------ requests
    async def generate_stream(self, prompt: PromptType = None, sampling_params: Any = None, *,
                              input_ids: Optional[list[int]] = None, rid: Optional[str] = None,
                              return_logprob: bool = False, logprob_start_len: int = -1,
                              top_logprobs_num: int = 0) -> AsyncIterator[StreamChunk]:
        if not self._started or self._closing:
            raise EngineNotRunning("the engine is not running")
        sp = _as_sampling_params(sampling_params)
        ids = self._prompt_ids(prompt, input_ids)
        rid = rid or uuid.uuid4().hex
        if rid in self._requests:
            raise InvalidRequest(f"request id {rid!r} is already in use", "rid")
        index, _ = self.router.route(ids, sp.n)
        replica = self.replicas[index]
        queue: asyncio.Queue = asyncio.Queue()
        self._requests[rid] = (replica, queue)
        finished, seen = 0, set()
        try:
            replica.out.send(Submit(rid, ids, sp, return_logprob, logprob_start_len,
                                    top_logprobs_num))
            while finished < sp.n:
                msg = await queue.get()
                if isinstance(msg, Failed):
                    finished = sp.n  # the replica holds nothing of it any more
                    raise _failure(msg)
                chunk = msg.chunk
                if chunk.index not in seen and chunk.prompt_tokens is not None:
                    seen.add(chunk.index)
                    replica.prompt_tokens += chunk.prompt_tokens
                    replica.cached_tokens += chunk.cached_tokens or 0
                finished += chunk.finished
                yield chunk
        finally:
            self._requests.pop(rid, None)
            self.router.finish(index, sp.n)
            if finished < sp.n and replica.out is not None:
                replica.out.send(Abort(rid))

    async def generate_into(self, deliver: Callable[[StreamChunk], None],
                            prompt: PromptType = None, sampling_params: Any = None,
                            **kwargs: Any) -> None:
        """Engine.generate_into's contract over the replicas' stream: each chunk is handed
        to `deliver` as it arrives (one wake-up per frame here: the replicas' frames
        arrive per step already)."""
        async for chunk in self.generate_stream(prompt, sampling_params, **kwargs):
            deliver(chunk)

    async def generate(self, prompt: PromptType = None, sampling_params: Any = None, *,
                       input_ids: Optional[list[int]] = None, rid: Optional[str] = None,
                       return_logprob: bool = False, logprob_start_len: int = -1,
                       top_logprobs_num: int = 0) -> Union[GenerateOutput, list[GenerateOutput]]:
        sp = _as_sampling_params(sampling_params)
        outs: dict[int, GenerateOutput] = {}
        async for c in self.generate_stream(prompt, sp, input_ids=input_ids, rid=rid,
                                            return_logprob=return_logprob,
                                            logprob_start_len=logprob_start_len,
                                            top_logprobs_num=top_logprobs_num):
            out = outs.get(c.index)
            if out is None:
                out = outs[c.index] = GenerateOutput(
                    rid=rid or "", index=c.index, text="", output_ids=[], finish_reason=None,
                    prompt_tokens=c.prompt_tokens or 0, completion_tokens=0,
                    cached_tokens=c.cached_tokens or 0)
                if return_logprob:
                    out.output_token_logprobs, out.output_top_logprobs = [], []
            out.text += c.text
            out.output_ids.extend(c.token_ids)
            out.completion_tokens = len(out.output_ids)
            if c.logprobs:
                out.output_token_logprobs.extend(c.logprobs)
            if c.top_logprobs:
                out.output_top_logprobs.extend(c.top_logprobs)
            if c.finished:
                out.finish_reason = c.finish_reason
                out.input_token_logprobs = c.input_token_logprobs
                out.input_top_logprobs = c.input_top_logprobs
        ordered = [outs[i] for i in sorted(outs)]
        return ordered[0] if len(ordered) == 1 else ordered

    def abort(self, rid: str) -> bool:
        entry = self._requests.get(rid)
        if entry is None or entry[0].out is None:
            return False
        entry[0].out.send(Abort(rid))
        return True

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("this engine has no tokenizer: send input_ids", "text")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _prompt_ids(self, prompt: PromptType, input_ids: Optional[list[int]]) -> list[int]:
        # Replicas check the ids (vocabulary, context length); routing needs them here.
        if input_ids is None and isinstance(prompt, list):
            prompt, input_ids = None, prompt
        if input_ids is not None:
            if prompt is not None:
                raise InvalidRequest("give either a text prompt or input_ids, not both", "text")
            return list(input_ids)
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        raise InvalidRequest("a prompt (text or input_ids) is required", "text")

    async def embed(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidRequest("this server runs --dp replicas of a generative model", "model")

    def flush_cache(self) -> bool:
        """Ask every replica to flush; refused (False) while requests run anywhere."""
        if self._requests:
            return False
        for r in self.replicas:
            if r.out is not None:
                r.out.send(Flush())
        self.router.clear()
        return True

    # ------------------------------------------------------------------ introspection
    def _loads(self) -> list[_Replica]:
        return [r for r in self.replicas if r.load is not None]

    def dp_stats(self) -> list[dict]:
        """Per replica: requests routed (and how many for a cached prefix), load, and the
        prefix-cache hit rate its engine reported."""
        out = []
        for r in self.replicas:
            route = self.router.stats[r.index] if self._started else None
            out.append({
                "replica": r.index,
                "alive": self.router.alive[r.index] if self._started else r.proc.poll() is None,
                "requests": route.requests if route else 0,
                "routed_by_prefix": route.by_prefix if route else 0,
                "in_flight": self.router.load[r.index] if self._started else 0,
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "hit_rate": r.cached_tokens / r.prompt_tokens if r.prompt_tokens else 0.0,
            })
        return out

    def _stats_line(self) -> str:
        return "; ".join(f"replica {s['replica']}: {s['requests']} requests "
                         f"({s['routed_by_prefix']} by prefix), hit rate "
                         f"{s['hit_rate'] * 100:.1f}%" for s in self.dp_stats())

    def memory_state(self) -> dict:
        loads = [r.load for r in self._loads()]
        return {"capacity": sum(x.capacity for x in loads), "free": sum(x.free for x in loads),
                "cached": sum(x.cached for x in loads),
                "running": sum(x.running for x in loads),
                "waiting": sum(x.waiting for x in loads), "dp": self.dp_stats()}


def _failure(msg: Failed) -> Exception:
    if msg.kind == "invalid":
        return InvalidRequest(msg.message, msg.param)
    if msg.kind == "not_running":
        return EngineNotRunning(msg.message)
    return RuntimeError(msg.message)
