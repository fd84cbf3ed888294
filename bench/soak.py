"""Soak test: N minutes of mixed traffic against an `asgl serve`, checking it returns to start.

    python bench/soak.py --minutes 30                      # launches a CPU server itself
    python bench/soak.py --minutes 8 --server-args "--model-path X --dp 1"
    python bench/soak.py --url http://127.0.0.1:30000 --pid 1234 --seconds 60

Traffic (each client loops, picking by weight): plain and streaming completions, chat
streams, n > 1, regex and JSON-schema constraints, logprobs with echo, requests aborted
through /abort_request, clients that hang up mid-stream, and embeddings when
--embed-url names an embedding server. Every --sample-every seconds one line: the server's
RSS and open fds (from /proc, given its pid), KV use (/get_server_info), requests and
errors so far, latency percentiles of the window.

At the end (traffic stopped, server idle) it checks: no error (a 5xx, an unexpected status
or a failed connection other than an intended hang-up), no request running or waiting,
every KV slot free or cached and all free after /flush_cache, fds back to their start,
RSS within --rss-tolerance of its value after warm-up. Prints a JSON summary (also to
--out) and exits 1 if a check failed. Not part of the test suite (a few-second smoke is).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Optional

import aiohttp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Write a haiku about the sea.", "List three prime numbers.",
           "Explain what a cache is in one sentence.", "Name a color and a fruit.",
           "Tell me a fact about the moon."]
SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                      "age": {"type": "integer"}},
                     "required": ["name", "age"]})
KINDS = {"complete": 3, "stream": 3, "chat_stream": 2, "n": 1, "regex": 1, "json": 1,
         "logprobs": 1, "abort": 1, "hangup": 1, "embed": 1}


class Stats:
    def __init__(self) -> None:
        self.done = self.errors = 0
        self.by_kind: dict[str, int] = {}
        self.window: list[float] = []
        self.error_samples: list[str] = []

    def ok(self, kind: str, seconds: float) -> None:
        self.done += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        self.window.append(seconds)

    def fail(self, kind: str, why: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(f"{kind}: {why}"[:300])


# ------------------------------------------------------------------------ one request each
async def _json(s: aiohttp.ClientSession, url: str, body: dict, expect: int = 200) -> Any:
    async with s.post(url, json=body) as r:
        data = await r.read()
        if r.status != expect:
            raise RuntimeError(f"{url} -> {r.status}: {data[:200]!r}")
        return json.loads(data)


async def _events(s: aiohttp.ClientSession, url: str, body: dict, stop_after: Optional[int] = None
                  ) -> int:
    """Read an SSE stream; returns events read (closes early after `stop_after`)."""
    count = 0
    async with s.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url} -> {r.status}: {(await r.read())[:200]!r}")
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                return count
            if b'"error"' in line:
                raise RuntimeError(f"in-band error: {line[:200]!r}")
            count += 1
            if stop_after is not None and count >= stop_after:
                return count  # leaving the block closes the connection: a hang-up
    raise RuntimeError("stream ended without [DONE]")


async def one(s: aiohttp.ClientSession, args: argparse.Namespace, kind: str,
              rng: random.Random) -> None:
    base, prompt = args.url, rng.choice(PROMPTS)
    tokens = rng.randint(4, args.max_tokens)
    if kind == "complete":
        await _json(s, base + "/v1/completions", {"prompt": prompt, "max_tokens": tokens,
                                                  "temperature": 0})
    elif kind == "stream":
        await _events(s, base + "/v1/completions", {"prompt": prompt, "max_tokens": tokens,
                                                    "stream": True, "temperature": 0.7})
    elif kind == "chat_stream":
        await _events(s, base + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "stream": True, "stream_options": {"include_usage": True}})
    elif kind == "n":
        out = await _json(s, base + "/v1/completions", {"prompt": prompt, "max_tokens": tokens,
                                                        "n": 3, "temperature": 1.0})
        assert len(out["choices"]) == 3
    elif kind == "regex":
        await _json(s, base + "/generate", {"text": prompt, "sampling_params": {
            "max_new_tokens": tokens, "regex": "(yes|no), [a-z]{1,8}\\."}})
    elif kind == "json":
        await _json(s, base + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Give a name and an age as JSON."}],
            "max_tokens": 48, "response_format": {"type": "json_schema", "json_schema": {
                "name": "person", "schema": json.loads(SCHEMA)}}})
    elif kind == "logprobs":
        await _json(s, base + "/v1/completions", {"prompt": prompt, "max_tokens": tokens,
                                                  "logprobs": 5, "echo": True})
    elif kind == "abort":
        rid = uuid.uuid4().hex
        task = asyncio.create_task(_events(s, base + "/generate", {
            "text": prompt, "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}))
        await asyncio.sleep(rng.uniform(0.05, 0.5))
        await _json(s, base + "/abort_request", {"rid": rid})
        await asyncio.wait_for(task, 60)  # the stream ends with an abort, then [DONE]
    elif kind == "hangup":
        await _events(s, base + "/v1/completions", {"prompt": prompt, "max_tokens": 200,
                                                    "stream": True, "ignore_eos": True},
                      stop_after=rng.randint(1, 3))
    elif kind == "embed":
        out = await _json(s, args.embed_url + "/v1/embeddings", {"input": [prompt, "x"]})
        assert len(out["data"]) == 2


async def client(args: argparse.Namespace, k: int, stats: Stats, until: float) -> None:
    rng = random.Random(args.seed * 1000 + k)
    kinds = [kd for kd in KINDS if kd != "embed" or args.embed_url]
    weights = [KINDS[kd] for kd in kinds]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as s:
        while time.monotonic() < until:
            kind = rng.choices(kinds, weights)[0]
            t0 = time.monotonic()
            try:
                await one(s, args, kind, rng)
                stats.ok(kind, time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 - every failure is counted and sampled
                stats.fail(kind, f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------ sampling
def proc_sample(pid: Optional[int]) -> dict:
    if pid is None:
        return {}
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return {"rss_mb": round(rss / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (OSError, StopIteration):
        return {}


async def server_info(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.admin_key or args.api_key}"} \
        if (args.admin_key or args.api_key) else {}
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.get(args.url + "/get_server_info") as r:
            return (await r.json())["memory_state"]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


async def sample(args: argparse.Namespace, stats: Stats, t0: float) -> dict:
    mem = await server_info(args)
    window, stats.window = stats.window, []
    row = {"t": round(time.monotonic() - t0, 1), **proc_sample(args.pid),
           "kv_used": mem["capacity"] - mem["free"] - mem["cached"], "kv_cached": mem["cached"],
           "running": mem["running"], "waiting": mem["waiting"], "done": stats.done,
           "errors": stats.errors, "p50_ms": _pct(window, 0.5), "p95_ms": _pct(window, 0.95),
           "p99_ms": _pct(window, 0.99)}
    print(json.dumps(row), flush=True)
    return row


# ------------------------------------------------------------------------ the run
async def soak(args: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    start = {**proc_sample(args.pid), "memory": await server_info(args)}
    until = t0 + args.seconds
    stats = Stats()
    clients = [asyncio.create_task(client(args, k, stats, until))
               for k in range(args.concurrency)]
    timeline, warm = [], None
    while time.monotonic() < until:
        await asyncio.sleep(min(args.sample_every, max(0.0, until - time.monotonic())))
        timeline.append(await sample(args, stats, t0))
        if warm is None and time.monotonic() - t0 >= args.warmup:
            warm = timeline[-1]
    await asyncio.gather(*clients)
    end = await settle(args)
    return check(args, stats, start, warm or (timeline[0] if timeline else start), end,
                 timeline)


async def settle(args: argparse.Namespace, timeout: float = 60.0) -> dict:
    """Wait until nothing runs or waits; then the memory, the process and a flush."""
    deadline = time.monotonic() + timeout
    mem = await server_info(args)
    while (mem["running"] or mem["waiting"]) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        mem = await server_info(args)
    await asyncio.sleep(1.0)  # closed connections and finished handlers settle
    headers = {"Authorization": f"Bearer {args.admin_key or args.api_key}"} \
        if (args.admin_key or args.api_key) else {}
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.post(args.url + "/flush_cache") as r:
            flushed = r.status == 200
    return {"memory": mem, "after_flush": await server_info(args), "flushed": flushed,
            **proc_sample(args.pid)}


def check(args: argparse.Namespace, stats: Stats, start: dict, warm: dict, end: dict,
          timeline: list) -> dict:
    problems = []
    if stats.errors:
        problems.append(f"{stats.errors} failed requests, e.g. {stats.error_samples[:3]}")
    if stats.done == 0:
        problems.append("no request completed")
    mem = end["memory"]
    if mem["running"] or mem["waiting"]:
        problems.append(f"not idle at the end: {mem}")
    if mem["free"] + mem["cached"] != mem["capacity"]:
        problems.append(f"KV slots leaked: {mem}")
    after = end["after_flush"]
    if end["flushed"] and after["free"] != after["capacity"]:
        problems.append(f"KV not all free after /flush_cache: {after}")
    if "fds" in start and end.get("fds", 0) > start["fds"] + args.fd_slack:
        problems.append(f"fds {start['fds']} at start, {end.get('fds')} at the end")
    if "rss_mb" in warm and "rss_mb" in end:
        growth = end["rss_mb"] / warm["rss_mb"] - 1
        if growth > args.rss_tolerance:
            problems.append(f"RSS {warm['rss_mb']} MB after warm-up, {end['rss_mb']} MB at "
                            f"the end (+{growth:.1%} > {args.rss_tolerance:.0%})")
    return {"ok": not problems, "problems": problems, "seconds": args.seconds,
            "concurrency": args.concurrency, "requests": stats.done, "errors": stats.errors,
            "by_kind": stats.by_kind, "start": start, "after_warmup": warm, "end": end,
            "timeline": timeline}


# ------------------------------------------------------------------------ server and CLI
def launch(args: argparse.Namespace) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "asgl.launch_server", "--host", "127.0.0.1", "--port",
           str(port), *shlex.split(args.server_args)]
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": REPO})
    args.url, args.pid = f"http://127.0.0.1:{port}", proc.pid
    import urllib.request
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(args.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become ready in 300 s")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--seconds", type=float, default=60.0, help="ignored with --minutes")
    p.add_argument("--url", default=None, help="a running server (default: launch one)")
    p.add_argument("--pid", type=int, default=None, help="its pid, for RSS and fds")
    p.add_argument("--server-args", default="--max-total-tokens 16384 --context-length 2048",
                   help="arguments of the launched server")
    p.add_argument("--server-log", default=None)
    p.add_argument("--embed-url", default=None, help="an embedding server to include")
    p.add_argument("--api-key", default=None)
    p.add_argument("--admin-key", default=None)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the RSS reference (default: 10%% of the run, <= 120)")
    p.add_argument("--rss-tolerance", type=float, default=0.05)
    p.add_argument("--fd-slack", type=int, default=2)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON summary here too")
    args = p.parse_args(argv)
    if args.minutes is not None:
        args.seconds = args.minutes * 60
    if args.warmup is None:
        args.warmup = min(120.0, args.seconds / 10)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    proc = launch(args) if args.url is None else None
    try:
        result = asyncio.run(soak(args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    text = json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
