"""A data-parallel replica: one full engine in its own process, served to the front.

    python -m asgl.engine.dp.replica --parent-pid PID  < ReplicaBoot as JSON

It starts its `Engine` (with `--tp` > 1 that engine starts its own rank processes), connects
to the front on 127.0.0.1, and serves requests until the front closes the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Optional

import msgspec
import torch

from asgl.engine.dp.ipc import (Abort, Chunk, Failed, Flush, Flushed, FrameReader, FrameWriter,
                                Hello, Load, ReplicaBoot, Submit, ToReplica)

logger = logging.getLogger(__name__)
_LOAD_INTERVAL_S = 0.25


class Replica:
    def __init__(self, boot: ReplicaBoot):
        from asgl.engine.loop.engine import Engine

        self.boot = boot
        self.engine = Engine(boot.config)
        self.out: Optional[FrameWriter] = None
        self.tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        engine = self.engine
        await engine.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.boot.port)
        self.out = FrameWriter(writer)
        self.out.send(Hello(index=self.boot.index, token=self.boot.token,
                            context_len=engine.context_len, vocab_size=engine.vocab_size,
                            capacity=engine.memory.capacity, pid=os.getpid(),
                            supports_grammar=bool(getattr(engine, "supports_grammar", False))))
        reporter = asyncio.create_task(self._report_load())
        inbox = FrameReader(reader, ToReplica)
        try:
            while (msg := await inbox.recv()) is not None:
                if isinstance(msg, Submit):
                    task = asyncio.create_task(self._serve(msg))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                elif isinstance(msg, Abort):
                    engine.abort(msg.rid)
                elif isinstance(msg, Flush):
                    self.out.send(Flushed(engine.flush_cache()))
        finally:  # the front is gone or closed us: stop
            reporter.cancel()
            await engine.shutdown()
            writer.close()

    async def _serve(self, msg: Submit) -> None:
        from asgl.engine.contracts.errors import EngineNotRunning
        from asgl.engine.contracts.errors import InvalidRequest

        out = self.out
        try:
            async for chunk in self.engine.generate_stream(
                    input_ids=msg.input_ids, sampling_params=msg.params, rid=msg.rid,
                    return_logprob=msg.return_logprob, logprob_start_len=msg.logprob_start_len,
                    top_logprobs_num=msg.top_logprobs_num):
                out.send(Chunk(msg.rid, chunk))
                await out.drain_if_backed_up()
        except InvalidRequest as exc:
            out.send(Failed(msg.rid, str(exc), "invalid", exc.param))
        except EngineNotRunning as exc:
            out.send(Failed(msg.rid, str(exc), "not_running"))
        except Exception as exc:  # reported to the front, which fails that request alone
            logger.exception("request %s failed", msg.rid)
            out.send(Failed(msg.rid, f"{type(exc).__name__}: {exc}", "error"))

    async def _report_load(self) -> None:
        last = None
        while True:
            sched, mem = self.engine.scheduler, self.engine.memory_state()
            s = sched.stats
            load = Load(running=mem["running"], waiting=mem["waiting"],
                        capacity=mem["capacity"], free=mem["free"], cached=mem["cached"],
                        num_steps=s.num_steps, prompt_tokens=s.prompt_tokens,
                        cached_tokens=s.cached_tokens, generated_tokens=s.generated_tokens,
                        num_retractions=s.num_retractions)
            if load != last:
                self.out.send(load)
                last = load
            await asyncio.sleep(_LOAD_INTERVAL_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asgl.engine.dp.replica")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    boot = msgspec.json.decode(sys.stdin.buffer.read(), type=ReplicaBoot)
    logging.basicConfig(level=getattr(logging, boot.config.log_level.upper()),
                        # the front prefixes every line of ours with [DP<index>]
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when replicas stop
    from asgl.engine.worker.tp_launch import watch_parent

    watch_parent(args.parent_pid)
    if boot.threads:
        torch.set_num_threads(boot.threads)
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(Replica(boot).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
