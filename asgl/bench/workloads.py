"""The reference workloads of DESIGN.md (GPU notes) and the JSON-lines record format.

Token ids are drawn at random with the workload's own seed, so every engine (asgl, HF,
vLLM) sees the same prompts. Every request is greedy with `ignore_eos`.

- W1: one 128-token prompt, 256 output tokens (batch-1 decode).
- W400: 400 prompts of 64-512 tokens (uniform, seed 0), 256 output tokens each.
- W1000: 1,000 prompts of 128-1,024 tokens (seed 1), 64-512 output tokens each.
- WP: 64 documents of 1,024 tokens, each followed by 8 different 64-token questions
  (512 requests, shuffled, seed 2), 128 output tokens each.
"""

from __future__ import annotations

import datetime
import json
import random
import subprocess
from dataclasses import dataclass

VOCAB_LLAMA3 = 128256


@dataclass
class Request:
    input_ids: list[int]
    output_len: int


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def make_workload(name: str, vocab: int = VOCAB_LLAMA3) -> list[Request]:
    name = name.upper()
    if name == "W1":
        rng = random.Random(0)
        return [Request(_ids(rng, 128, vocab), 256)]
    if name == "W400":
        rng = random.Random(0)
        return [Request(_ids(rng, rng.randint(64, 512), vocab), 256) for _ in range(400)]
    if name == "W1000":
        rng = random.Random(1)
        out = []
        for _ in range(1000):
            n_in, n_out = rng.randint(128, 1024), rng.randint(64, 512)
            out.append(Request(_ids(rng, n_in, vocab), n_out))
        return out
    if name == "WP":
        rng = random.Random(2)
        reqs = []
        for _ in range(64):
            doc = _ids(rng, 1024, vocab)
            reqs.extend(Request(doc + _ids(rng, 64, vocab), 128) for _ in range(8))
        rng.shuffle(reqs)
        return reqs
    raise ValueError(f"unknown workload {name!r}: W1, W400, W1000 or WP")


def card() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a record without a card name is still useful
        pass
    return "cpu"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def append_record(path: str | None, record: dict) -> None:
    """Add card, date and commit to `record`, print it, append it to `path` (JSON lines)."""
    record = {"card": card(), "date": datetime.date.today().isoformat(), "rev": git_rev(),
              **record}
    line = json.dumps(record)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
