"""Online time-to-first-token while a /v1/batches batch runs, against an idle server.

Starts `asgl serve` (the embedded SmolLM2 on the CPU unless `--server-args` says otherwise),
measures the TTFT of `--probes` streamed chat requests sent one after another on the idle
server, then uploads a `--lines`-line batch (chat lines of `--batch-max-tokens` tokens),
waits until it runs, and measures the same probes while it does. The claim checked: online
TTFT during the batch stays within 2x of idle (`--max-batch-in-flight` caps the batch lines
in the engine, so an online request always finds room). Prints one JSON line; the batch is
cancelled at the end.

    python bench/batch_ttft.py --lines 1000 --probes 20
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _ttft(session: aiohttp.ClientSession, url: str, i: int) -> float:
    body = {"model": "default", "stream": True, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": f"Probe {i}: name a fruit."}]}
    start = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:
            if line.startswith(b"data: ") and b'"content"' in line:
                first = time.perf_counter() - start
                async for _ in r.content:  # drain the rest
                    pass
                return first
    raise RuntimeError("no content in the stream")


async def _probes(url: str, n: int, gap: float) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as session:
        await _ttft(session, url, -1)  # warm-up, not counted
        for i in range(n):
            out.append(await _ttft(session, url, i))
            await asyncio.sleep(gap)
    return out


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median_ms": round(statistics.median(ordered) * 1000, 1),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--batch-max-tokens", type=int, default=16)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between probes")
    parser.add_argument("--server-args", default="",
                        help="extra `asgl serve` flags")
    args = parser.parse_args(argv)

    import openai

    port = _free_port()
    storage = tempfile.mkdtemp(prefix="asgl-batch-bench-")
    log = open(os.path.join(storage, "server.log"), "w")
    cmd = [sys.executable, "-m", "asgl.launch_server", "--host", "127.0.0.1", "--port",
           str(port), "--file-storage-path", storage, *shlex.split(args.server_args)]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(open(log.name).read()[-3000:])
                time.sleep(0.5)
        idle = asyncio.run(_probes(url, args.probes, args.gap))
        lines = "".join(json.dumps({
            "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "default", "max_tokens": args.batch_max_tokens,
                     "temperature": 0, "ignore_eos": True, "messages": [
                         {"role": "user", "content": f"Write about topic number {i}."}]}})
            + "\n" for i in range(args.lines)).encode()
        uploaded = client.files.create(file=("bench.jsonl", io.BytesIO(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        while client.batches.retrieve(batch.id).request_counts.completed < 8:
            time.sleep(0.1)
        busy = asyncio.run(_probes(url, args.probes, args.gap))
        state = client.batches.retrieve(batch.id)
        client.batches.cancel(batch.id)
        result = {"lines": args.lines, "batch_max_tokens": args.batch_max_tokens,
                  "server_args": args.server_args, "idle": _stats(idle),
                  "during_batch": _stats(busy),
                  "batch_lines_done_at_end_of_probes": state.request_counts.completed,
                  "ratio_median": round(statistics.median(busy) / statistics.median(idle), 2),
                  "ratio_p90": round(_stats(busy)["p90_ms"] / _stats(idle)["p90_ms"], 2)}
        print(json.dumps(result))
        return 0 if result["ratio_median"] <= 2.0 else 1
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    sys.exit(main())
