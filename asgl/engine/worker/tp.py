"""Tensor parallelism: rank 0's model runner and the loop of every other rank.

Ranks, processes and threads (docs/architecture.md, "Tensor and data parallelism"):

- Rank 0 is the engine's process. Its `DeviceWorker` thread builds a `TPModelRunner`,
  which starts node 0's other ranks, joins the process group and owns rank 0's shard
  (an ordinary `ModelRunner` built while the group is up, so every layer takes its slice).
  Each step it broadcasts the batch (tp_comm.py), then runs its own shard; the model's
  all-reduces and all-gathers line the ranks up. Only rank 0 samples; it then broadcasts
  the sampled ids so the other ranks can resolve the next step's placeholder ids.
- Every other rank is a `TPWorkerProcess` (`python -m asgl.engine.worker.tp_main`): its main
  thread owns its device and loops on commands from rank 0 (init memory, step, shutdown).
  It never sees a request: only the batch's tensors.

The KV pool is sharded by heads for free: each rank's model reports its own KV heads (one
replicated head when the KV heads don't divide by the TP size), and the pool is sized from
them. The number of token slots must agree, since rank 0's scheduler allocates slots for
all: every rank computes its capacity and the smallest wins.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from asgl.config import EngineConfig
from asgl.distributed import (destroy_distributed, get_cpu_group, get_tp_group,
                              init_distributed)
from asgl.engine.contracts.step import StepOutput, StepPlan
from asgl.engine.worker.model_runner import ModelRunner
from asgl.engine.worker.tp_comm import (STEP_FIELDS, ControlChannel, Header, Op, decode_step,
                                        encode_step, share_next_ids)
from asgl.engine.worker.tp_launch import (RankPlan, call_watching, prepare_environment,
                                          rank_device, set_cpu_threads, spawn_rank,
                                          stop_processes)

logger = logging.getLogger(__name__)

_SAMPLE_ROWS = STEP_FIELDS.index("sample_rows")


def create_model_runner(cfg: EngineConfig, source: Any) -> Union[ModelRunner, "TPModelRunner"]:
    """The engine's runner (call it on the device-worker thread)."""
    if cfg.tp_size > 1:
        return TPModelRunner(cfg, source)
    return ModelRunner(cfg, source)


def warm_up_device_group(device: torch.device) -> None:
    """One tiny all-reduce on the device group: NCCL builds its communicators now, eagerly,
    not inside the first CUDA-graph capture; and a broken interconnect fails at start."""
    dist.all_reduce(torch.zeros(1, device=device), group=get_tp_group())


def agree_capacity(runner: ModelRunner) -> int:
    """The smallest KV capacity (in tokens) of all ranks: a collective on every rank."""
    value = torch.tensor([runner.kv_capacity()], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=get_cpu_group())
    return int(value.item())


class TPModelRunner:
    """Rank 0's runner: the ModelRunner interface the engine uses, over all TP ranks."""

    def __init__(self, cfg: EngineConfig, source: Any):
        self.plan = RankPlan.from_config(cfg)
        if self.plan.node_rank != 0:
            raise ValueError("the engine runs on node 0; node k > 0 runs `run_node`")
        self.procs = []
        self._closed = False
        # Set when a step failed: the ranks are out of step (one is gone or stuck in a
        # collective), so nothing can run any more. `asgl serve` must be restarted.
        self._broken: Optional[str] = None
        prepare_environment(cfg, self.plan)
        device = rank_device(cfg, 0)
        set_cpu_threads(device, self.plan.ranks_per_node)
        try:
            self.procs = [spawn_rank(cfg, self.plan, r) for r in self.plan.node_ranks(0)[1:]]
            call_watching(lambda: init_distributed(self.plan.world, 0, self.plan.init_method,
                                                   device=device), self.procs)
            if device.type == "cuda":
                torch.cuda.set_device(device)  # current device is per thread
            warm_up_device_group(device)
            self.channel = ControlChannel()
            self.runner = ModelRunner(cfg, source)
            self.capacity = agree_capacity(self.runner)
        except BaseException:
            self._teardown()
            raise
        logger.info("tensor parallel: %d ranks on %d node(s), KV pool per rank for %d KV "
                    "head(s), %d tokens", self.plan.world, self.plan.nnodes,
                    self.runner.model.num_kv_heads, self.capacity)

    def __getattr__(self, name: str) -> Any:
        # Everything else (device, vocab_size, kv_pool, gpu_stats, ...) is rank 0's shard's.
        runner = self.__dict__.get("runner")
        if runner is None:
            raise AttributeError(name)
        return getattr(runner, name)

    def kv_capacity(self) -> int:
        return self.capacity

    def init_memory(self, num_tokens: int, max_reqs: int, context_len: int) -> None:
        self.channel.send(Header(op=Op.INIT_MEMORY, args=[num_tokens, max_reqs, context_len]))
        self.runner.init_memory(num_tokens, max_reqs, context_len)

    def step(self, plan: StepPlan) -> StepOutput:
        if self._broken:
            raise RuntimeError(self._broken)
        try:
            # Broadcast first: the local step moves the batch's tensors to the device.
            header, payload = encode_step(plan.forward, plan.table_writes)
            self.channel.send(header, payload)
            out = self.runner.step(plan)
            count = header.sizes[_SAMPLE_ROWS]
            if count > 0:
                share_next_ids(self.runner.last_next_ids, count, self.runner.device)
            return out
        except Exception as exc:
            self._broken = (f"the tensor-parallel group is broken ({type(exc).__name__}: "
                            f"{exc}); restart the engine")
            logger.error("%s", self._broken)
            raise

    def close(self) -> None:
        """Stop every rank (on the worker thread, after the last step)."""
        if self._closed:
            return
        self._closed = True
        if not self._broken:
            try:
                self.channel.send(Header(op=Op.SHUTDOWN))
            except Exception:  # a rank already gone: the teardown below reaps the rest
                logger.warning("could not tell the tensor-parallel ranks to stop",
                               exc_info=True)
                self._broken = "shutdown failed"
        self._teardown(grace_s=0.0 if self._broken else 10.0)

    def _teardown(self, grace_s: float = 0.0) -> None:
        stop_processes(self.procs, grace_s)
        destroy_distributed()
        self.plan.cleanup()


class TPWorkerProcess:
    """Rank r >= 1: build this rank's shard, then run what rank 0 broadcasts until told to
    stop. The main thread is the device's worker thread (there is no event loop here)."""

    def __init__(self, cfg: EngineConfig, rank: int, world: int, local_rank: int,
                 init_method: str):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.local_rank, self.init_method = local_rank, init_method
        self.runner: Optional[ModelRunner] = None

    def run(self) -> None:
        from asgl.models.loader import resolve_model

        device = rank_device(self.cfg, self.local_rank)
        set_cpu_threads(device, self.world // self.cfg.nnodes)
        init_distributed(self.world, self.rank, self.init_method, device=device)
        try:
            warm_up_device_group(device)
            channel = ControlChannel()
            # Only rank 0 tokenizes: skip the tokenizer's lookup here.
            source = resolve_model(self.cfg.replace(skip_tokenizer_init=True))
            self.runner = ModelRunner(self.cfg, source)
            agree_capacity(self.runner)
            self._serve(channel)
        finally:
            destroy_distributed()

    def _serve(self, channel: ControlChannel) -> None:
        runner = self.runner
        while True:
            header, payload = channel.recv()
            if header.op == Op.SHUTDOWN:
                logger.info("rank %d: shutdown", self.rank)
                return
            if header.op == Op.INIT_MEMORY:
                num_tokens, max_reqs, context_len = header.args
                runner.init_memory(num_tokens, max_reqs, context_len)
                if runner.req_to_token is None:
                    # On the CPU rank 0 reads its scheduler's table directly; this rank
                    # keeps a replica, updated from the writes sent with each step.
                    runner.req_to_token = torch.zeros((max_reqs, context_len),
                                                      dtype=torch.int64, device=runner.device)
                continue
            batch, writes = decode_step(header, payload)
            # forward and logits only: no sampling
            runner.step(StepPlan(forward=batch, table_writes=writes))
            count = header.sizes[_SAMPLE_ROWS]
            if count > 0:
                runner.last_next_ids = share_next_ids(None, count, runner.device)
