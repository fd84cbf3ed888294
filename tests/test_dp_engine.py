"""`asgl serve --dp 2` on the CPU: two engine replicas behind one server. Requests that
share a document prefix go to the replica that already holds it (each answer reports the
prefix as cached), both replicas get work, and the per-replica hit rates are reported."""

from __future__ import annotations

import json
import random
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tests.parallel_helpers import process_group, read_log
from tests.server_fixture import free_port

DOC_LEN, QUESTION_LEN, DOCS, QUESTIONS = 160, 12, 6, 3
GREEDY = {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True}


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _wait_healthy(url: str, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited ({proc.returncode}):\n{read_log(proc)[-3000:]}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"--dp server not healthy:\n{read_log(proc)[-3000:]}")


def test_dp2_routes_shared_prefixes_to_their_replica():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "asgl.launch_server", "--dp", "2", "--model-path",
           "tiny-llama", "--load-format", "dummy", "--device", "cpu", "--max-total-tokens",
           "8192", "--random-seed", "0", "--host", "127.0.0.1", "--port", str(port)]
    rng = random.Random(0)
    docs = [[rng.randrange(100, 40000) for _ in range(DOC_LEN)] for _ in range(DOCS)]

    def ask(d: int) -> dict:
        ids = docs[d] + [rng.randrange(100, 40000) for _ in range(QUESTION_LEN)]
        return _post(url + "/generate", {"input_ids": ids, "sampling_params": GREEDY})

    with process_group(cmd) as server:
        _wait_healthy(url, server)
        with ThreadPoolExecutor(8) as pool:
            # one question per document first (they spread over the replicas) ...
            first = list(pool.map(ask, range(DOCS)))
            assert all(o["meta_info"]["cached_tokens"] == 0 for o in first)
            # ... then the rest at once, shuffled: each must find its document cached
            order = [d for d in range(DOCS) for _ in range(QUESTIONS)]
            rng.shuffle(order)
            rest = list(pool.map(ask, order))
        cached = [o["meta_info"]["cached_tokens"] for o in rest]
        assert all(c >= DOC_LEN for c in cached), cached
        assert all(len(o["output_ids"]) == GREEDY["max_new_tokens"] for o in rest)

        info = _get(url + "/get_server_info")
        stats = info["memory_state"]["dp"]
        print("per-replica routing and prefix-cache hit rates:", json.dumps(stats))
        assert sum(s["requests"] for s in stats) == DOCS * (QUESTIONS + 1)
        assert all(s["requests"] >= QUESTIONS + 1 for s in stats), stats  # both got documents
        assert sum(s["routed_by_prefix"] for s in stats) == DOCS * QUESTIONS
        total_prompt = DOCS * (QUESTIONS + 1) * (DOC_LEN + QUESTION_LEN)
        assert sum(s["prompt_tokens"] for s in stats) == total_prompt
        hit = sum(s["cached_tokens"] for s in stats) / total_prompt
        # every question after the first per document hits its document's DOC_LEN tokens
        assert hit >= DOCS * QUESTIONS * DOC_LEN / total_prompt - 1e-9, stats
        assert all(s["hit_rate"] > 0.5 for s in stats), stats
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            assert b"cache_hit_rate" in r.read()

        server.terminate()  # graceful: the replicas stop with the front
        assert server.wait(60) == 0, read_log(server)[-3000:]
        assert "replica 0:" in read_log(server)  # the shutdown line with the hit rates
