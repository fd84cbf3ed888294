"""Stop strings at their ceiling (issue 16): 64 stops of 1,024 characters cost a bounded
amount per request and per token, and still stop exactly where the text says."""

from __future__ import annotations

import random
import time
import tracemalloc

import pytest

from asgl.engine.loop.detokenizer import IncrementalDetokenizer
from tests.test_detokenizer import TEXTS, stream

LONG = " ".join(TEXTS * 12)  # ~3,000 characters


@pytest.fixture(scope="module")
def tok(hf_smol_tokenizer):
    return hf_smol_tokenizer


def _junk_stops(k: int, n: int) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice("qzxjvkw#@") for _ in range(n)) for _ in range(k)]


@pytest.mark.parametrize("chunks", [[1], [3, 1, 7]])
def test_long_stops_stop_exactly_there(tok, chunks):
    ids = tok.encode(LONG, add_special_tokens=False)
    full = tok.decode(ids)
    stop = full[900:1900]  # 1,000 characters spanning many tokens
    stops = _junk_stops(63, 1024) + [stop]
    tracemalloc.start()
    detok = IncrementalDetokenizer(tok, [], stop_strings=stops)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # (an exact prefix set of these stops holds 33 MB of strings)
    deltas, matched = stream(detok, ids, chunks)
    assert matched == stop
    assert "".join(deltas) == full[:full.find(stop)]


def test_long_stops_that_never_match_release_all_text(tok):
    ids = tok.encode(LONG, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop_strings=_junk_stops(64, 1024))
    started = time.perf_counter()
    deltas, matched = stream(detok, ids)
    per_token = (time.perf_counter() - started) / len(ids)
    assert matched is None and "".join(deltas) == tok.decode(ids)
    print(f"{per_token * 1e6:.0f} us per token")
    assert per_token < 5e-4  # bounded by the stops, not by the text so far


def test_short_stops_keep_the_exact_hold(tok):
    detok = IncrementalDetokenizer(tok, [], stop_strings=["three", "xyz"])
    ids = tok.encode("one two thr", add_special_tokens=False)
    assert "".join(detok.step([i])[0] for i in ids) == "one two "
