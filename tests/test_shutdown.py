"""Graceful shutdown keeps its word: after SIGTERM or SIGINT, requests that outlast
`--shutdown-timeout` still end with a final chunk carrying a finish reason and `[DONE]`,
and the server exits 0 within the timeout + 5 s. A second signal exits at once.

Each test starts its own `asgl serve` (it is the one being stopped) on a free port.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import pytest

from server_fixture import ServerProcess, free_port

SHUTDOWN_TIMEOUT = 5.0
# Long enough to outlast the timeout on any machine: a CPU decodes SmolLM2 at ~10-100
# tokens/s per request; ignore_eos keeps the model from stopping early.
MAX_TOKENS = 900

ROUTES = {
    "chat": ("/v1/chat/completions", {"model": "default", "stream": True,
                                      "messages": [{"role": "user", "content": "Tell a story."}],
                                      "max_tokens": MAX_TOKENS, "ignore_eos": True}),
    "completions": ("/v1/completions", {"model": "default", "stream": True,
                                        "prompt": "Once upon a time,", "max_tokens": MAX_TOKENS,
                                        "ignore_eos": True}),
    "native": ("/generate", {"text": "Once upon a time,", "stream": True, "sampling_params": {
        "max_new_tokens": MAX_TOKENS, "ignore_eos": True}}),
}


class StreamClient(threading.Thread):
    """Reads one SSE stream to its end; records the events and whether [DONE] came."""

    def __init__(self, port: int, path: str, body: dict):
        super().__init__(daemon=True)
        self.port, self.path, self.body = port, path, body
        self.events: list[dict] = []
        self.done = False
        self.first = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            conn.request("POST", self.path, json.dumps(self.body),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    self.done = True
                    break
                self.events.append(json.loads(data))
                self.first.set()
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            self.error = e
        finally:
            self.first.set()

    def finish_reason(self) -> str | None:
        if not self.events:
            return None
        last = self.events[-1]
        if "choices" in last:  # OpenAI: the reason is on the last choice chunk
            reasons = [c.get("finish_reason") for e in self.events for c in e.get("choices", [])]
            return next((r for r in reversed(reasons) if r), None)
        return (last.get("meta_info") or {}).get("finish_reason", {}).get("type")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_every_stream_with_a_final_chunk(sig):
    server = ServerProcess(["--shutdown-timeout", str(SHUTDOWN_TIMEOUT)], free_port())
    try:
        server.wait_ready()
        clients = [StreamClient(server.port, *ROUTES[name]) for name in ROUTES]
        for c in clients:
            c.start()
        for c in clients:
            assert c.first.wait(120), "no first chunk"
        signalled = time.monotonic()
        server.proc.send_signal(sig)
        rc = server.proc.wait(SHUTDOWN_TIMEOUT + 20)
        took = time.monotonic() - signalled
        for c in clients:
            c.join(10)
        log = server.log()
        assert rc == 0, log[-3000:]
        assert took < SHUTDOWN_TIMEOUT + 5, (took, log[-3000:])
        assert took > SHUTDOWN_TIMEOUT - 0.5, "in-flight requests were not given their time"
        for name, c in zip(ROUTES, clients):
            assert c.error is None, (name, c.error)
            assert c.done, f"{name}: no [DONE]"
            assert c.finish_reason() == "abort", (name, c.events[-2:])
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop(signal.SIGKILL)


def test_a_second_signal_exits_at_once():
    server = ServerProcess(["--shutdown-timeout", "60"], free_port())
    try:
        server.wait_ready()
        client = StreamClient(server.port, *ROUTES["completions"])
        client.start()
        assert client.first.wait(120)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(10)
        assert time.monotonic() - signalled < 5
        assert server.proc.returncode == 1
    finally:
        server.stop(signal.SIGKILL)


def test_idle_server_stops_at_once():
    server = ServerProcess([], free_port())
    try:
        server.wait_ready()
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0
        assert time.monotonic() - signalled < 10
    finally:
        server.stop(signal.SIGKILL)
