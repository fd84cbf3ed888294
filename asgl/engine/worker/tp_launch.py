"""Which process runs which tensor-parallel rank, and starting and stopping them.

With `--tp T --nnodes N` (T divisible by N) node k runs ranks k*T/N .. (k+1)*T/N - 1, rank
r on its local device r mod T/N. Global rank 0 (node 0) is the `asgl serve` process: its
event loop, scheduler and device-worker thread. Every other rank is a process of its own
(`python -m asgl.engine.worker.tp_main`): node 0 spawns its local ones from the engine; on node
k > 0, `asgl serve` only spawns that node's ranks and waits (`run_node`).

Rendezvous: `--dist-init-addr host:port` (rank 0's host; needed with several nodes), or a
file in a private temporary directory on a single node. Rank processes get the engine
config as JSON on stdin and watch their parent: when it is gone, they exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import msgspec
import torch

from asgl.config import EngineConfig

logger = logging.getLogger(__name__)

_STOP_GRACE_S = 10.0


@dataclass
class RankPlan:
    world: int
    nnodes: int
    node_rank: int
    init_method: str
    _tmpdir: Optional[str] = field(default=None, repr=False)

    @property
    def ranks_per_node(self) -> int:
        return self.world // self.nnodes

    def node_ranks(self, node: Optional[int] = None) -> list[int]:
        node = self.node_rank if node is None else node
        per = self.ranks_per_node
        return list(range(node * per, (node + 1) * per))

    def local_rank(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def cleanup(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "RankPlan":
        tmpdir = None
        if cfg.dist_init_addr:
            init_method = "tcp://" + cfg.dist_init_addr.removeprefix("tcp://")
        elif cfg.nnodes > 1:
            raise ValueError("--nnodes > 1 needs --dist-init-addr host:port (node 0's address)")
        else:
            # A file store needs no free port (nothing to race for) and stays on this host.
            tmpdir = tempfile.mkdtemp(prefix="asgl-tp-")
            init_method = f"file://{os.path.join(tmpdir, 'rendezvous')}"
        return cls(cfg.tp_size, cfg.nnodes, cfg.node_rank, init_method, tmpdir)


def rank_device(cfg: EngineConfig, local_rank: int) -> torch.device:
    from asgl.engine.worker.model_runner import resolve_device

    device = resolve_device(cfg)
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def prepare_environment(cfg: EngineConfig, plan: RankPlan) -> None:
    """Process environment every rank of this node needs before the process group exists
    (children inherit it)."""
    # NVLink SHARP (multicast) needs fabric setup the lent machines lack; plain rings work.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    tcp = plan.init_method.startswith("tcp://")
    host = plan.init_method.removeprefix("tcp://").rpartition(":")[0].strip("[]") if tcp else ""
    if not tcp or _is_loopback(host):
        # Ranks that meet in a file or on a loopback address are all on this machine: keep
        # gloo's connections on the loopback interface (its default follows the hostname,
        # which may not resolve to a reachable address).
        lo = _loopback_interface()
        if lo:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
    if cfg.enable_p2p_check and torch.cuda.is_available():
        _check_p2p(plan.ranks_per_node)


def _check_p2p(num_local: int) -> None:
    """SGLang's --enable-p2p-check: test peer access between this node's GPUs and make
    NCCL avoid P2P when some pair lacks it (instead of failing or hanging in a kernel)."""
    count = min(num_local, torch.cuda.device_count())
    bad = [(a, b) for a in range(count) for b in range(count)
           if a != b and not torch.cuda.can_device_access_peer(a, b)]
    if bad:
        logger.warning("no P2P access between GPUs %s: NCCL_P2P_DISABLE=1", bad)
        os.environ["NCCL_P2P_DISABLE"] = "1"
    else:
        logger.info("P2P access checked between %d GPUs", count)


def _is_loopback(host: str) -> bool:
    try:
        return all(info[4][0].startswith("127.") or info[4][0] == "::1"
                   for info in socket.getaddrinfo(host, None))
    except OSError:
        return False


def _loopback_interface() -> Optional[str]:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n in ("lo", "lo0")), None)


def set_cpu_threads(device: torch.device, ranks_per_node: int) -> None:
    """On the CPU, split the cores among this node's ranks (they compute in lockstep, so
    more threads than cores would only make them wait for each other)."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_per_node))


# ---------------------------------------------------------------------- processes
def spawn_rank(cfg: EngineConfig, plan: RankPlan, rank: int) -> subprocess.Popen:
    """Start `rank` as `python -m asgl.engine.worker.tp_main`; the config goes on stdin as JSON."""
    cmd = [sys.executable, "-m", "asgl.engine.worker.tp_main", "--rank", str(rank),
           "--world", str(plan.world), "--local-rank", str(plan.local_rank(rank)),
           "--init-method", plan.init_method, "--parent-pid", str(os.getpid())]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=dict(os.environ))
    proc.stdin.write(msgspec.json.encode(cfg))
    proc.stdin.close()
    return proc


def stop_processes(procs: list[subprocess.Popen], grace_s: float = _STOP_GRACE_S) -> None:
    """Wait up to `grace_s` for each process to exit, then SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def call_watching(fn: Callable[[], None], procs: list[subprocess.Popen],
                  what: str = "tensor-parallel start-up") -> None:
    """Run the blocking `fn` (process-group rendezvous) in a helper thread, failing at once
    if a rank process this one started dies meanwhile (else the rendezvous would wait for
    its whole timeout)."""
    done = threading.Event()
    error: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # reported in the calling thread
            error.append(exc)
        finally:
            done.set()

    threading.Thread(target=target, name="asgl-tp-init", daemon=True).start()
    while not done.wait(0.2):
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{what}: rank process {dead[0].pid} exited with code "
                               f"{dead[0].returncode}")
    if error:
        raise error[0]


def watch_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    """Exit this process when its parent is gone (so ranks never outlive their engine)."""
    def loop() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=loop, name="asgl-parent-watch", daemon=True).start()


# ---------------------------------------------------------------------- node k > 0
def run_node(cfg: EngineConfig) -> int:
    """`asgl serve --node-rank k` (k > 0): run this node's ranks until they exit (rank 0 shut
    down or failed) or a signal asks to stop. No HTTP server runs here."""
    plan = RankPlan.from_config(cfg)
    prepare_environment(cfg, plan)
    ranks = plan.node_ranks()
    logger.info("node %d of %d: starting tensor-parallel ranks %s (rendezvous %s)",
                plan.node_rank, plan.nnodes, ranks, plan.init_method)
    procs = [spawn_rank(cfg, plan, r) for r in ranks]
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %d: stopping ranks %s", signum, ranks)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        while not stop.is_set():
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                code = next((c for c in codes if c), 0)
                break
            failed = [c for c in codes if c]
            if failed:  # one rank failed: the group is broken
                code = failed[0]
                break
            stop.wait(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        stop_processes(procs, grace_s=0)
        for s, handler in previous.items():
            signal.signal(s, handler)
    logger.info("node %d: ranks exited (code %d)", plan.node_rank, code)
    return code
