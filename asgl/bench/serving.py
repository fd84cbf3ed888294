"""Online serving benchmark: send requests to a running server, measure latency and throughput.

Like `python -m sglang.bench_serving`: requests arrive at a fixed rate (Poisson) or all
at once, optionally capped at a maximum concurrency; prompt and output lengths come from
a random (uniform) or ShareGPT-like (log-normal, synthetic) distribution. Works against
asgl (native /generate with token ids: exact lengths), and any OpenAI-compatible server
(/v1/completions or /v1/chat/completions, streaming, usage from `include_usage`).

    asgl bench serving --base-url http://127.0.0.1:30000 --num-prompts 200 \\
        --dataset random --input-len 512 --output-len 128 --request-rate 8

Reports request/token throughput and TTFT, inter-token latency (ITL), time per output
token (TPOT) and end-to-end latency (mean, p50, p90, p99); appends one JSON line per run
to --output (nothing is written without it). Also `python -m asgl.bench_serving`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import aiohttp

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

# Common English words: with an unknown tokenizer, " word" is about one token each.
_WORDS = ("the of and to in is was for on that with as by at from his her it an were are "
          "which this be or has had not but what all when there can one who been more said "
          "time about some them would other into then only could first these two new way "
          "people may water long day did made find part over sound work place year live "
          "back give most very after thing name good sentence man think say great where help "
          "through much before line right too mean old any same tell boy follow came want "
          "show also around form three small set put end does another well large must big "
          "even such because turn here why ask went men read need land different home us "
          "move try kind hand picture again change off play spell air away animal house "
          "point page letter mother answer found study still learn should world high").split()


@dataclass
class Request:
    prompt: Optional[str]  # text (OpenAI backends)
    input_ids: Optional[list[int]]  # token ids (asgl native backend)
    prompt_len: int  # intended prompt length in tokens
    output_len: int


@dataclass
class Result:
    ok: bool
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


# --------------------------------------------------------------------------- datasets


def _lengths(args: argparse.Namespace, rng: random.Random) -> list[tuple[int, int]]:
    out = []
    for _ in range(args.num_prompts):
        if args.dataset == "random":
            lo_in = max(1, int(args.input_len * args.range_ratio))
            lo_out = max(1, int(args.output_len * args.range_ratio))
            out.append((rng.randint(lo_in, args.input_len), rng.randint(lo_out, args.output_len)))
        else:  # ShareGPT-like: long-tailed, medians near the real dataset's
            p = int(rng.lognormvariate(5.0, 1.0))  # median ~150 tokens
            o = int(rng.lognormvariate(5.3, 0.8))  # median ~200 tokens
            out.append((min(max(p, 4), args.input_len), min(max(o, 4), args.output_len)))
    return out


def make_requests(args: argparse.Namespace, vocab_size: Optional[int]) -> list[Request]:
    rng = random.Random(args.seed)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    reqs = []
    for p_len, o_len in _lengths(args, rng):
        if args.backend == "asgl" and vocab_size:
            # skip the lowest ids: special tokens in most vocabularies
            ids = [rng.randrange(min(256, vocab_size // 2), vocab_size) for _ in range(p_len)]
            reqs.append(Request(None, ids, p_len, o_len))
        elif tokenizer is not None:
            ids = [rng.randrange(min(256, tokenizer.vocab_size // 2), tokenizer.vocab_size)
                   for _ in range(p_len)]
            reqs.append(Request(tokenizer.decode(ids), None, p_len, o_len))
        else:
            text = " ".join(rng.choice(_WORDS) for _ in range(p_len))
            reqs.append(Request(text, None, p_len, o_len))
    return reqs


# --------------------------------------------------------------------------- clients


def _payload(args: argparse.Namespace, req: Request) -> tuple[str, dict]:
    if args.backend == "asgl":
        prompt = {"input_ids": req.input_ids} if req.input_ids else {"text": req.prompt}
        return "/generate", {**prompt, "stream": True, "sampling_params": {
            "max_new_tokens": req.output_len, "temperature": args.temperature,
            "ignore_eos": args.ignore_eos}}
    common = {"model": args.model, "max_tokens": req.output_len, "stream": True,
              "temperature": args.temperature, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        common["ignore_eos"] = True  # an SGLang/vLLM extension
    if args.backend == "openai-chat":
        return "/v1/chat/completions", {
            **common, "messages": [{"role": "user", "content": req.prompt}]}
    return "/v1/completions", {**common, "prompt": req.prompt}


def _delta(args: argparse.Namespace, event: dict, state: dict) -> tuple[bool, Optional[dict]]:
    """(did this event carry new output, the token counts if it reports them)."""
    if args.backend == "asgl":
        text = event.get("text", "")
        ids = event.get("output_ids")
        grew = len(ids) > state.get("n", 0) if ids is not None else len(text) > state.get("n", 0)
        state["n"] = len(ids) if ids is not None else len(text)
        return grew, event.get("meta_info")
    usage = event.get("usage")
    choices = event.get("choices") or []
    if not choices:
        return False, usage
    c = choices[0]
    piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
    return bool(piece), usage


async def send(session: aiohttp.ClientSession, args: argparse.Namespace,
               req: Request) -> Result:
    path, body = _payload(args, req)
    start = time.perf_counter()
    res = Result(ok=False, prompt_len=req.prompt_len)
    last = None
    state: dict = {}
    chunks = 0
    try:
        async with session.post(args.base_url.rstrip("/") + path, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"])[:200]
                    return res
                grew, counts = _delta(args, event, state)
                now = time.perf_counter()
                if grew:
                    chunks += 1
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                if counts:  # what the server counted beats what we meant to send
                    res.output_len = counts.get("completion_tokens", res.output_len)
                    res.prompt_len = counts.get("prompt_tokens", res.prompt_len)
        res.e2e = time.perf_counter() - start
        res.output_len = res.output_len or chunks
        res.ok = True
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout,
                                     connector=connector) as session:
        vocab = None
        if args.backend == "asgl":
            async with session.get(args.base_url.rstrip("/") + "/get_model_info") as r:
                vocab = (await r.json()).get("vocab_size") if r.status == 200 else None
        reqs = make_requests(args, vocab)
        limit = asyncio.Semaphore(args.max_concurrency or len(reqs) or 1)
        bar = tqdm(total=len(reqs), disable=args.disable_tqdm) if tqdm else None
        rng = random.Random(args.seed + 1)

        async def one(req: Request) -> Result:
            async with limit:
                res = await send(session, args, req)
            if bar is not None:
                bar.update(1)
            return res

        loop_cpu0 = _thread_cpu_s(args.server_pid)
        start = time.perf_counter()
        sampler = asyncio.ensure_future(_sample_running(session, args)) \
            if args.sample_running else None
        tasks = []
        for req in reqs:
            tasks.append(asyncio.ensure_future(one(req)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        loop_cpu = _thread_cpu_s(args.server_pid) - loop_cpu0 if args.server_pid else None
        running: list[float] = []
        if sampler is not None:
            sampler.cancel()
            running = await asyncio.gather(sampler, return_exceptions=True)
            running = [] if isinstance(running[0], BaseException) else running[0]
        if bar is not None:
            bar.close()
    summary = summarize(args, results, duration)
    busy = [v for v in running if v > 0]
    # the decode batch the server ran at: the bar ITL is held to (one_batch.py at this size)
    summary["running_batch"] = {"median": statistics.median(busy) if busy else 0.0,
                                "samples": len(busy)}
    if loop_cpu is not None:
        out = summary["total_output_tokens"]
        summary["server_loop_cpu"] = {"seconds": round(loop_cpu, 2),
                                      "share_of_wall": round(loop_cpu / duration, 3),
                                      "us_per_output_token": round(1e6 * loop_cpu / out, 1)
                                      if out else None}
    return summary


def _thread_cpu_s(pid: Optional[int]) -> float:
    """CPU seconds (user + system) of the main thread of process `pid` (the server's event
    loop), from /proc (Linux; the server on this host)."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_RUNNING = "num_running_reqs"


async def _sample_running(session: aiohttp.ClientSession, args: argparse.Namespace) -> list:
    """The server's running batch size, read from /metrics every 0.25 s until cancelled
    (asgl's `asgl:num_running_reqs`, SGLang's `sglang:num_running_reqs`, vLLM's
    `vllm:num_requests_running`); returns the samples ([] when the server has no such gauge)."""
    url = args.base_url.rstrip("/").removesuffix("/v1") + "/metrics"
    samples: list[float] = []
    try:
        while True:
            try:
                async with session.get(url) as r:
                    text = await r.text() if r.status == 200 else ""
            except aiohttp.ClientError:
                text = ""
            for line in text.splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name.endswith(_RUNNING) or name.endswith("num_requests_running"):
                    samples.append(float(line.rsplit(" ", 1)[1]))
                    break
            await asyncio.sleep(0.25)
    except asyncio.CancelledError:
        return samples


# --------------------------------------------------------------------------- report


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _dist(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"mean": statistics.fmean(ms) if ms else 0.0, "p50": _pct(ms, 50),
            "p90": _pct(ms, 90), "p99": _pct(ms, 99)}


def summarize(args: argparse.Namespace, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    errors = [r.error for r in results if not r.ok]
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {k: (str(v) if v == float("inf") else v) for k, v in vars(args).items()
                   if k != "api_key"},
        "completed": len(ok), "failed": len(errors), "errors": errors[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "input_token_throughput": in_tokens / duration if duration else 0.0,
        "output_token_throughput": out_tokens / duration if duration else 0.0,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "ttft_ms": _dist([r.ttft for r in ok]),
        "itl_ms": _dist([g for r in ok for g in r.itl]),
        "tpot_ms": _dist(tpot),
        "e2e_ms": _dist([r.e2e for r in ok]),
    }


def print_report(s: dict) -> None:
    print(f"{'completed / failed':<28}{s['completed']} / {s['failed']}")
    print(f"{'duration (s)':<28}{s['duration_s']:.2f}")
    print(f"{'requests/s':<28}{s['request_throughput']:.2f}")
    print(f"{'input tokens/s':<28}{s['input_token_throughput']:.1f}")
    print(f"{'output tokens/s':<28}{s['output_token_throughput']:.1f}")
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        d = s[key]
        print(f"{key:<28}mean {d['mean']:.1f}  p50 {d['p50']:.1f}  p90 {d['p90']:.1f}  "
              f"p99 {d['p99']:.1f}")
    if s.get("server_loop_cpu"):
        c = s["server_loop_cpu"]
        print(f"{'server loop CPU':<28}{c['seconds']:.1f} s ({100 * c['share_of_wall']:.0f}% of "
              f"the run), {c['us_per_output_token']} us per output token")
    if s.get("running_batch", {}).get("samples"):
        print(f"{'median running batch':<28}{s['running_batch']['median']:.0f} "
              f"({s['running_batch']['samples']} samples of /metrics)")
    for e in s["errors"]:
        print("error:", e)


def parse_args(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--backend", choices=["asgl", "openai", "openai-chat"], default="asgl",
                   help="asgl: native /generate with token ids; openai: /v1/completions; "
                        "openai-chat: /v1/chat/completions (any OpenAI-compatible server)")
    p.add_argument("--model", default="default", help="model name sent to OpenAI endpoints")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random", "sharegpt"], default="random",
                   help="random: uniform lengths; sharegpt: synthetic long-tailed lengths "
                        "shaped like ShareGPT (no download)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=512, help="max prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="max output tokens")
    p.add_argument("--range-ratio", type=float, default=1.0,
                   help="random lengths are uniform in [len * ratio, len]")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (Poisson arrivals); inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the output length (default on; an SGLang/vLLM "
                        "extension field: use --no-ignore-eos against servers without it)")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer to build text prompts of exact length (OpenAI backends)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="per request, seconds")
    p.add_argument("--output", "--output-file", dest="output_file", default=None,
                   help="append one JSON line with the results to this file (default: print "
                        "only)")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--server-pid", type=int, default=None,
                   help="the server's process id on this host: report its event-loop "
                        "thread's CPU time per output token (Linux /proc)")
    p.add_argument("--sample-running", action=argparse.BooleanOptionalAction, default=True,
                   help="read the server's running batch size from /metrics during the run "
                        "and report its median")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> dict:
    args = parse_args(argv, prog)
    summary = asyncio.run(run(args))
    print_report(summary)
    if args.output_file:
        with open(args.output_file, "a") as f:
            f.write(json.dumps(summary) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["failed"] == 0 else 1)
