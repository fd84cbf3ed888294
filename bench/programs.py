"""asgl programs against the same logic written with plain async `openai` client calls, on
one `asgl serve`: six workloads after SGLang's paper benchmarks.

    python bench/programs.py                       # starts `asgl serve` (embedded model)
    python bench/programs.py --url http://localhost:30000 --num 16

Workloads: few-shot QA (MMLU-style, 5 shots), HellaSwag-style `select`, a ReAct-style agent
loop, tree-of-thought with nested `fork`, JSON decoding with a regex, multi-turn chat. Each
runs `--num` programs with `run_batch` (asgl) and as `asyncio.gather` of coroutines making
the same requests (plain client). The prefix cache is flushed before each form, so neither
gets the other's cache. It prints programs/s, output tokens/s and the share of prompt tokens
served from the prefix cache for both, per workload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import asgl.lang as sgl  # noqa: E402

SUBJECTS = ["France", "Japan", "Peru", "Kenya", "Norway", "Chile", "Egypt", "Canada", "India",
            "Spain", "Italy", "Brazil", "Ghana", "Chad", "Laos", "Fiji"]

FEW_SHOT = "".join(
    f"Question: Which continent is {c} in?\n(A) Europe (B) Asia (C) Africa (D) America\n"
    f"Answer: {a}\n\n" for c, a in [("France", "A"), ("Japan", "B"), ("Kenya", "C"),
                                      ("Peru", "D"), ("Norway", "A")])
SELECT_SHOTS = ("Cooking: A man cracks two eggs into a bowl. He whisks them with a fork.\n\n"
                "Swimming: A girl stands at the edge of the pool. She dives into the water.\n\n"
                "Running: A woman ties her shoes at the start line. She runs down the track.\n\n")
ENDINGS = [" paints the wall.", " falls asleep.", " reads a book.", " sings a song."]
REACT = ("Answer questions by searching. Use this format:\n"
         "Thought 1: I need to find the capital of Chile.\nAction 1: Search[capital of Chile]\n"
         "Observation 1: Santiago is the capital of Chile.\nThought 2: I know the answer.\n"
         "Action 2: Finish[Santiago]\n\n")
# tree-of-thought prompts open with worked examples (as the paper's do): the tree's prefix
TOT = ("Solve the problem by thinking of ideas, then of steps for each idea.\n" + "".join(
    f"Problem: plan a trip to {c}.\nIdea: visit {sight} first.\nStep: book a flight to "
    f"{c}.\nStep: buy a ticket for {sight}.\nIdea: travel by train.\nStep: check the "
    f"timetable.\nStep: reserve a seat.\n\n" for c, sight in [
        ("Italy", "the Colosseum"), ("France", "the Louvre"), ("Egypt", "the pyramids"),
        ("Japan", "Mount Fuji"), ("Peru", "Machu Picchu")]) + "Problem: ")
JSON_REGEX = r'\{"country": "[A-Za-z ]{1,12}", "population": [0-9]{1,4}\}'

OUT = 6  # output tokens per gen: small, so prefills and requests dominate, as in agents


# ---------------------------------------------------------------------- asgl programs
@sgl.function
def few_shot(s, subject):
    s += FEW_SHOT + f"Question: Which continent is {subject} in?\n"
    s += "(A) Europe (B) Asia (C) Africa (D) America\nAnswer:" + sgl.gen(
        "answer", max_tokens=2, stop="\n")


@sgl.function
def hellaswag(s, subject):
    s += SELECT_SHOTS + f"Travel: A tourist arrives in {subject}. He"
    s += sgl.select("ending", choices=ENDINGS)


@sgl.function
def react(s, subject):
    s += REACT + f"Question: What is the capital of {subject}?\n"
    for i in range(1, 3):
        s += f"Thought {i}:" + sgl.gen(max_tokens=OUT, stop="\n") + "\n"
        s += f"Action {i}: Search[" + sgl.gen(f"act{i}", max_tokens=OUT, stop="]") + "]\n"
        s += f"Observation {i}: nothing found.\n"


@sgl.function
def tree_of_thought(s, subject):
    s += TOT + f"plan a trip to {subject}.\n"
    ideas = s.fork(2)
    ideas += sgl.gen("idea", max_tokens=OUT, stop="\n") + "\n"
    # every idea's steps are queued before any join, so all four run at once
    trees = [idea.fork(2) for idea in ideas]
    for steps in trees:
        steps += "Step:" + sgl.gen("step", max_tokens=OUT, stop="\n")
    for steps in trees:
        steps.join()
    ideas.join()


@sgl.function
def json_decode(s, subject):
    s += f"Describe {subject} as JSON with its country name and population in millions.\n"
    s += sgl.gen("json", max_tokens=24, regex=JSON_REGEX)


@sgl.function
def chat(s, subject):
    s += sgl.user(f"Name a city in {subject}.")
    s += sgl.assistant(sgl.gen("a1", max_tokens=OUT))
    s += sgl.user("Name another one.")
    s += sgl.assistant(sgl.gen("a2", max_tokens=OUT))


# ---------------------------------------------------------------------- plain client
class Plain:
    """The same requests with the openai SDK; counts tokens as the server reports them."""

    def __init__(self, client: Any):
        self.client = client
        self.prompt = self.cached = self.completion = 0

    def _count(self, usage: Any) -> None:
        self.prompt += usage.prompt_tokens
        self.completion += usage.completion_tokens
        details = getattr(usage, "prompt_tokens_details", None)
        self.cached += getattr(details, "cached_tokens", 0) or 0

    async def complete(self, prompt: str, **kw: Any) -> str:
        resp = await self.client.completions.create(model="default", prompt=prompt,
                                                    temperature=0, **kw)
        self._count(resp.usage)
        return resp.choices[0].text

    async def chat(self, messages: list[dict], **kw: Any) -> str:
        resp = await self.client.chat.completions.create(model="default", messages=messages,
                                                         temperature=0, **kw)
        self._count(resp.usage)
        return resp.choices[0].message.content

    async def score(self, prompt: str, choice: str) -> float:
        """Mean logprob of `choice`'s tokens after `prompt` (echo + logprobs)."""
        resp = await self.client.completions.create(
            model="default", prompt=prompt + choice, max_tokens=1, temperature=0, echo=True,
            logprobs=0)
        self._count(resp.usage)
        lp = resp.choices[0].logprobs
        mine = [v for v, off in zip(lp.token_logprobs, lp.text_offset)
                if v is not None and len(prompt) <= off < len(prompt + choice)]
        return sum(mine) / len(mine) if mine else float("-inf")


async def plain_few_shot(p: Plain, subject: str) -> None:
    await p.complete(FEW_SHOT + f"Question: Which continent is {subject} in?\n(A) Europe (B) "
                     "Asia (C) Africa (D) America\nAnswer:", max_tokens=2, stop="\n")


async def plain_hellaswag(p: Plain, subject: str) -> None:
    prompt = SELECT_SHOTS + f"Travel: A tourist arrives in {subject}. He"
    await asyncio.gather(*(p.score(prompt, c) for c in ENDINGS))


async def plain_react(p: Plain, subject: str) -> None:
    text = REACT + f"Question: What is the capital of {subject}?\n"
    for i in range(1, 3):
        text += f"Thought {i}:"
        text += await p.complete(text, max_tokens=OUT, stop="\n") + "\n"
        text += f"Action {i}: Search["
        text += await p.complete(text, max_tokens=OUT, stop="]") + "]\n"
        text += f"Observation {i}: nothing found.\n"


async def plain_tree_of_thought(p: Plain, subject: str) -> None:
    text = TOT + f"plan a trip to {subject}.\n"
    ideas = await asyncio.gather(*(p.complete(text, max_tokens=OUT, stop="\n")
                                   for _ in range(2)))
    await asyncio.gather(*(p.complete(text + idea + "\nStep:", max_tokens=OUT, stop="\n")
                           for idea in ideas for _ in range(2)))


async def plain_json_decode(p: Plain, subject: str) -> None:
    await p.complete(f"Describe {subject} as JSON with its country name and population in "
                     "millions.\n", max_tokens=24, extra_body={"regex": JSON_REGEX})


async def plain_chat(p: Plain, subject: str) -> None:
    messages = [{"role": "user", "content": f"Name a city in {subject}."}]
    messages.append({"role": "assistant", "content": await p.chat(messages, max_tokens=OUT)})
    messages.append({"role": "user", "content": "Name another one."})
    await p.chat(messages, max_tokens=OUT)


WORKLOADS: list[tuple[str, Any, Callable]] = [
    ("few-shot QA", few_shot, plain_few_shot),
    ("select (HellaSwag)", hellaswag, plain_hellaswag),
    ("ReAct agent", react, plain_react),
    ("tree of thought", tree_of_thought, plain_tree_of_thought),
    ("JSON regex", json_decode, plain_json_decode),
    ("multi-turn chat", chat, plain_chat),
]


# ---------------------------------------------------------------------- running
def flush(url: str) -> None:
    req = urllib.request.Request(url + "/flush_cache", method="POST")
    for _ in range(50):  # refused while requests still hold cached prefixes
        try:
            with urllib.request.urlopen(req, timeout=10):
                return
        except OSError:
            time.sleep(0.1)


def metas(state: Any) -> list[dict]:
    """Every gen/select meta of a state and its forks' states (tokens counted once each)."""
    ex, out, seen = state._ex, [], set()
    stack = [ex]
    while stack:
        e = stack.pop()
        for m in e.meta.values():
            if isinstance(m, dict) and m.get("id") not in seen or not m.get("id"):
                if isinstance(m, dict) and "prompt_tokens" in m:
                    seen.add(m.get("id"))
                    out.append(m)
        stack.extend(e.children)
    return out


def run_asgl(program: Any, subjects: list[str], backend: Any) -> dict:
    backend.token_usage.reset()
    start = time.perf_counter()
    states = program.run_batch([{"subject": s} for s in subjects], backend=backend,
                               temperature=0)
    elapsed = time.perf_counter() - start
    failed = [s.error() for s in states if s.error() is not None]
    if failed:
        raise SystemExit(f"{program.__name__}: {failed[0]!r}")
    cached = sum(m.get("cached_tokens") or 0 for s in states for m in metas(s))
    prompt = sum(m.get("prompt_tokens") or 0 for s in states for m in metas(s))
    return {"s": elapsed, "completion": backend.token_usage.completion_tokens,
            "cached_share": cached / max(prompt, 1)}


async def run_plain(fn: Callable, subjects: list[str], base_url: str) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY") as client:
        p = Plain(client)
        await p.complete("Hi", max_tokens=1)  # connect before the clock starts
        p.prompt = p.cached = p.completion = 0
        start = time.perf_counter()
        await asyncio.gather(*(fn(p, s) for s in subjects))
        elapsed = time.perf_counter() - start
    return {"s": elapsed, "completion": p.completion, "cached_share": p.cached / max(p.prompt, 1)}


def start_server(server_args: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "asgl.launch_server", "--host", "127.0.0.1", "--port",
           str(port), "--random-seed", "0", *server_args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"asgl serve exited with {proc.returncode}")
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("asgl serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--num", type=int, default=8, help="programs per workload")
    parser.add_argument("--only", nargs="*", default=None, help="workload names to run")
    parser.add_argument("--server-args", nargs="*", default=[])
    parser.add_argument("--out", default=None, help="append the results as a JSON line")
    args = parser.parse_args()

    proc, url = (None, args.url) if args.url else start_server(args.server_args)
    rows = []
    try:
        backend = sgl.RuntimeEndpoint(url)
        subjects = [SUBJECTS[i % len(SUBJECTS)] + ("" if i < len(SUBJECTS) else f" {i}")
                    for i in range(args.num)]
        # warm up: connections, and the chat template RuntimeEndpoint loads on first use
        few_shot.run(subject="Chad", backend=backend, temperature=0)
        chat.run(subject="Chad", backend=backend, temperature=0)
        for name, program, plain in WORKLOADS:
            if args.only and not any(o.lower() in name.lower() for o in args.only):
                continue
            flush(url)
            ours = run_asgl(program, subjects, backend)
            flush(url)
            theirs = asyncio.run(run_plain(plain, subjects, url + "/v1"))
            rows.append({"workload": name, "programs": args.num, "asgl": ours,
                         "plain": theirs})
        sgl.interpreter.call_sync(backend.aclose())
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    print(f"{'workload':<20} {'form':<6} {'programs/s':>10} {'tokens/s':>9} {'cached':>7}")
    for row in rows:
        for form in ("asgl", "plain"):
            r = row[form]
            print(f"{row['workload']:<20} {form:<6} {row['programs'] / r['s']:>10.2f} "
                  f"{r['completion'] / r['s']:>9.1f} {r['cached_share']:>7.0%}")
        print(f"{'':<20} asgl/plain time {row['asgl']['s'] / row['plain']['s']:.2f}x")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"rows": rows, "cpus": os.cpu_count()}) + "\n")


if __name__ == "__main__":
    main()
