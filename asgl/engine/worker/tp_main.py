"""Entry point of a tensor-parallel rank process (rank >= 1); see asgl/engine/tp.py.

    python -m asgl.engine.worker.tp_main --rank R --world W --local-rank L \
        --init-method tcp://host:port --parent-pid PID  < config.json

The engine config arrives as JSON on stdin (msgspec), so nothing is unpickled.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import msgspec
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asgl.engine.worker.tp_main")
    for name in ("--rank", "--world", "--local-rank", "--parent-pid"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--init-method", required=True)
    args = parser.parse_args(argv)

    from asgl.config import EngineConfig
    from asgl.engine.worker.tp import TPWorkerProcess
    from asgl.engine.worker.tp_launch import watch_parent

    cfg = msgspec.json.decode(sys.stdin.buffer.read(), type=EngineConfig)
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper()),
                        format=f"%(asctime)s %(levelname)s [TP{args.rank}] %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group: rank 0 decides when to stop (SHUTDOWN), and
    # this process exits on its own when its parent is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(args.parent_pid)
    torch.set_grad_enabled(False)
    try:
        TPWorkerProcess(cfg, args.rank, args.world, args.local_rank, args.init_method).run()
    except Exception:
        logging.getLogger("asgl.engine.worker.tp").exception("rank %d failed", args.rank)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # Skip the interpreter's teardown (seconds with torch loaded): nothing is left to save.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
