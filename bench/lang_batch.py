"""`fn.run_batch` of 64 programs against running them one by one, on `asgl serve`.

run_batch sends every program at once, so the server's continuous batching runs them
together; one by one, each waits for the previous. Each program is SGLang's README
`text_qa` (a question, then `gen` with `ignore_eos` so every run does the same work).

    python bench/lang_batch.py                      # starts `asgl serve` (embedded model)
    python bench/lang_batch.py --url http://localhost:30000 --num 64 --max-tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import asgl as sgl  # noqa: E402

SUBJECTS = ["France", "Japan", "Peru", "Kenya", "Norway", "Chile", "Egypt", "Canada"]
TOPICS = ["capital", "largest city", "main language", "currency", "highest mountain",
          "longest river", "national dish", "oldest university"]


@sgl.function
def text_qa(s, question, max_tokens):
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", max_tokens=max_tokens, ignore_eos=True)


def questions(n: int, max_tokens: int) -> list[dict]:
    out = []
    for i in range(n):
        subject, topic = SUBJECTS[i % len(SUBJECTS)], TOPICS[(i // len(SUBJECTS)) % len(TOPICS)]
        out.append({"question": f"What is the {topic} of {subject}? (#{i})",
                    "max_tokens": max_tokens})
    return out


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "asgl.launch_server", "--host", "127.0.0.1", "--port",
           str(port), "--random-seed", "0", *args.server_args]
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
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--server-args", nargs="*", default=[])
    parser.add_argument("--out", default=None, help="append the result as a JSON line")
    args = parser.parse_args()

    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        sgl.set_default_backend(sgl.RuntimeEndpoint(url))
        batch = questions(args.num, args.max_tokens)
        text_qa.run_batch(batch[:4], temperature=0)  # warm up: connections, first steps

        start = time.perf_counter()
        serial = [text_qa.run(**kw, temperature=0) for kw in batch]
        serial_s = time.perf_counter() - start

        start = time.perf_counter()
        batched = text_qa.run_batch(batch, temperature=0, progress_bar=True)
        batch_s = time.perf_counter() - start
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    tokens = sum(s.get_meta_info("answer")["completion_tokens"] for s in batched)
    assert tokens == sum(s.get_meta_info("answer")["completion_tokens"] for s in serial)
    result = {"programs": args.num, "max_tokens": args.max_tokens, "output_tokens": tokens,
              "one_by_one_s": round(serial_s, 2), "run_batch_s": round(batch_s, 2),
              "speedup": round(serial_s / batch_s, 2), "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine()}
    print(json.dumps(result))
    print(f"{args.num} programs x {args.max_tokens} tokens: one by one {serial_s:.2f} s, "
          f"run_batch {batch_s:.2f} s ({serial_s / batch_s:.1f}x)")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
