"""Two processes on one machine acting as two nodes (loopback only): `asgl serve --tp 2
--nnodes 2 --node-rank 0/1 --dist-init-addr 127.0.0.1:PORT`. Node 0 serves HTTP with rank
0; node 1 runs rank 1 and no server. Requests get TP=1's greedy outputs, and stopping node
0 stops node 1."""

from __future__ import annotations

import json
import sys
import time
import urllib.request

from tests.conftest import make_llm
from tests.parallel_helpers import assert_greedy_matches, process_group, read_log, reference
from tests.server_fixture import free_port

MODEL = ["--model-path", "tiny-llama", "--load-format", "dummy", "--device", "cpu",
         "--max-total-tokens", "4096", "--random-seed", "0"]
GREEDY = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}
PROMPTS = [[1, 520, 4417, 30, 1070], [1, 9906, 11, 856, 836, 374], [1, 400, 401, 402],
           [1, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]]


def _node(rank: int, dist_port: int, http_port: int) -> list[str]:
    return [sys.executable, "-m", "asgl.launch_server", "--tp", "2", "--nnodes", "2",
            "--node-rank", str(rank), "--dist-init-addr", f"127.0.0.1:{dist_port}",
            "--host", "127.0.0.1", "--port", str(http_port), *MODEL]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _wait_healthy(url: str, procs, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, \
                f"a node exited ({proc.returncode}):\n{read_log(proc)[-3000:]}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("node 0 did not become healthy:\n" +
                         "\n".join(read_log(p)[-2000:] for p in procs))


def test_two_nodes_on_loopback_serve_like_tp1():
    dist_port, http_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http_port}"
    # node 1 first: it waits for node 0 at the rendezvous, as on a real cluster
    with process_group(_node(1, dist_port, http_port)) as node1, \
            process_group(_node(0, dist_port, http_port)) as node0:
        llm = make_llm(model_path="tiny-llama", load_format="dummy", device="cpu",
                       max_total_tokens=4096, random_seed=0)
        try:
            refs = reference(llm, PROMPTS, GREEDY)
        finally:
            llm.shutdown()
        _wait_healthy(url, [node0, node1])
        outs = _post(url + "/generate", {"input_ids": PROMPTS, "sampling_params": GREEDY})
        for i, (out, ref) in enumerate(zip(outs, refs)):
            assert_greedy_matches(out["output_ids"], ref, f"two nodes, prompt {i}")
        chat = _post(url + "/v1/completions", {"model": "m", "prompt": "Hello there",
                                               "max_tokens": 5, "temperature": 0})
        assert chat["usage"]["completion_tokens"] == 5
        log1 = read_log(node1)
        assert "node 1 of 2: starting tensor-parallel ranks [1]" in log1, log1[-2000:]
        assert "asgl is serving" not in log1  # node 1 runs no server

        node0.terminate()  # SIGTERM: graceful stop, which tells rank 1 to stop
        assert node0.wait(30) == 0, read_log(node0)[-3000:]
        assert node1.wait(30) == 0, read_log(node1)[-3000:]
