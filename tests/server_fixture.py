"""Live `asgl serve` processes for the server tests.

Each server is a subprocess (`python -m asgl.launch_server`) on 127.0.0.1 with a small
context and KV pool, started at most once per test session for each configuration (a
start loads the model: seconds) and stopped at the end. Test modules use the fixtures
below by importing them: `from server_fixture import main_server  # noqa: F401`.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTEXT_LEN = 1024
KV_TOKENS = 16384
API_KEY = "sk-asgl-test"
SGLANG_DEFAULT_PORT = 30000
# torch's intra-op threads in the servers (unless OMP_NUM_THREADS is set): one core is left
# to the pytest process that drives them, as conftest.py does for in-process engines. On a
# 2-core machine a server with 2 threads decodes a batch of 64 three times slower than with
# one (the CPU attention runs many small per-request ops).
SERVER_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the server binds: a port that only has connections in TIME_WAIT is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], port: int, api_key: Optional[str] = None):
        self.port = port
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = self.url + "/v1"
        self.log_file = tempfile.NamedTemporaryFile(prefix=f"asgl-server-{port}-",
                                                    suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "asgl.launch_server", "--host", "127.0.0.1",
               "--port", str(port), "--context-length", str(CONTEXT_LEN),
               "--max-total-tokens", str(KV_TOKENS), "--random-seed", "0", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {"OMP_NUM_THREADS": str(SERVER_THREADS), **os.environ,
               "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        with open(self.log_file.name, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"asgl serve exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"asgl serve not ready in {timeout} s:\n{self.log()[-4000:]}")

    def get_json(self, path: str) -> dict:
        req = urllib.request.Request(self.url + path, headers=self.headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def memory_state(self) -> dict:
        return self.get_json("/get_server_info")["memory_state"]

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """The memory state once nothing runs or waits (aborts settle within a step)."""
        deadline = time.monotonic() + timeout
        while True:
            mem = self.memory_state()
            if (mem["running"] == 0 and mem["waiting"] == 0) or time.monotonic() > deadline:
                return mem
            time.sleep(0.05)

    def assert_no_leak(self) -> None:
        """Idle, and every KV slot is free or held by the prefix cache (evictable);
        flushing the cache then frees the whole pool."""
        mem = self.wait_idle()
        assert mem["running"] == 0 and mem["waiting"] == 0, mem
        assert mem["free"] + mem["cached"] == mem["capacity"], mem
        req = urllib.request.Request(self.url + "/flush_cache", method="POST",
                                     headers=self.headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        mem = self.memory_state()
        assert mem["free"] == mem["capacity"], mem

    def assert_clean_log(self) -> None:
        """No tracebacks or errors logged so far (bad input must not look like a bug)."""
        bad = [line for line in self.log().splitlines()
               if "Traceback" in line or " ERROR " in line]
        assert not bad, "\n".join(bad[:10]) + "\n" + self.log()[-3000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


_servers: dict[str, ServerProcess] = {}


def shared_server(name: str, args: list[str], port: Optional[int] = None,
                  api_key: Optional[str] = None) -> ServerProcess:
    """The session's server called `name`, started on first use."""
    server = _servers.get(name)
    if server is None or server.proc.poll() is not None:
        server = ServerProcess(args, port or free_port(), api_key)
        _servers[name] = server
        server.wait_ready()
    return server


@atexit.register
def _stop_all() -> None:
    for server in _servers.values():
        if server.stop() in (0, -signal.SIGTERM):  # keep the logs of servers that failed
            os.unlink(server.log_file.name)


@pytest.fixture(scope="session")
def main_server() -> ServerProcess:
    """No API key, no queue limit; on a free port, never a fixed one (two runs of the
    suite at once must not collide): README snippets get their port rewritten."""
    return shared_server("main", [])


@pytest.fixture(scope="session")
def guarded_server() -> ServerProcess:
    """--api-key and a short queue (--max-queued-requests) on a small running batch."""
    return shared_server("guarded", ["--max-queued-requests", "4", "--max-running-requests",
                                     "2"], api_key=API_KEY)
