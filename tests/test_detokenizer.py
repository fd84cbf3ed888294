"""Incremental detokenizer on the embedded SmolLM2 tokenizer (byte-level BPE)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgl.engine.loop.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Emoji 😀🎉👩‍👩‍👧 and CJK 你好，世界。日本語のテキスト 한국어",
    "  leading spaces,\ttabs\nand newlines\n\n  indented code: def f(x): return x ** 2",
    "Ünïcödé àccents: naïve café — “quotes” … ½ ∑ ∫",
]


@pytest.fixture(scope="session")
def tok(hf_smol_tokenizer):
    """transformers' tokenizer of the embedded GGUF (conftest.py: parsed once a session)."""
    return hf_smol_tokenizer


@pytest.fixture(scope="session")
def byte_ids(tok) -> list[int]:
    """The single-byte tokens (one character each in the byte-level alphabet)."""
    ids = sorted(i for t, i in tok.get_vocab().items() if len(t) == 1 and i >= 17)
    assert len(ids) > 200  # bytes that never occur in UTF-8 (0xC0, 0xF5..) may be missing
    return ids


def stream(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None
           ) -> tuple[list[str], str | None]:
    """Feed ids in chunks (default one by one); returns the deltas and the stop matched."""
    deltas, i, k = [], 0, 0
    while i < len(ids):
        n = chunks[k % len(chunks)] if chunks else 1
        k += 1
        delta, matched = detok.step(ids[i:i + n])
        i += n
        deltas.append(delta)
        if matched is not None:
            return deltas, matched
    deltas.append(detok.flush())  # a stop can still be found in the released text
    return deltas, detok.matched_stop


# ---------------------------------------------------------------- plain streaming
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(tok, text):
    prompt = tok.encode("User says:", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas, matched = stream(detok, ids)
    assert matched is None
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)  # never half a character


def test_multibyte_characters_split_over_byte_tokens(tok, byte_ids):
    byte_tok = {tok.convert_ids_to_tokens(i): i for i in byte_ids}
    # byte-level alphabet: printable latin-1 bytes map to themselves, others shifted
    alphabet = tok.convert_ids_to_tokens(byte_ids)
    assert len(set(alphabet)) == len(alphabet)
    text = "a😀b你c"
    ids = tok.encode(text, add_special_tokens=False)
    # re-spell the emoji and the CJK char one byte token at a time
    spelled = [t for i in ids for t in _as_byte_tokens(tok, i, byte_tok)]
    assert len(spelled) > len(ids) and tok.decode(spelled) == text
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.step([i])[0] for i in spelled]
    assert deltas.count("😀") == 1 and deltas.count("你") == 1
    assert "".join(deltas) == text and detok.flush() == ""


def _as_byte_tokens(tok, token_id: int, byte_tok: dict[str, int]) -> list[int]:
    token = tok.convert_ids_to_tokens(token_id)
    return [byte_tok[ch] for ch in token]


def test_prompt_ending_inside_a_character(tok, byte_ids):
    byte_tok = {tok.convert_ids_to_tokens(i): i for i in byte_ids}
    spelled = [t for i in tok.encode("😀", add_special_tokens=False)
               for t in _as_byte_tokens(tok, i, byte_tok)]
    prompt, output = spelled[:2], spelled[2:]  # the emoji's bytes straddle the seam
    detok = IncrementalDetokenizer(tok, tok.encode("Hi", add_special_tokens=False) + prompt)
    deltas, _ = stream(detok, output)
    assert "".join(deltas) == tok.decode(output)  # two stray continuation bytes


def test_first_output_token_keeps_its_leading_space(tok):
    prompt = tok.encode("Hello", add_special_tokens=False)
    ids = tok.encode(" world and more", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.step(ids[:1]) == (" world", None)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = (tok.encode("Hi there", add_special_tokens=False) + [im_end, im_start]
           + tok.encode("assistant\nOK 👍", add_special_tokens=False) + [im_end])
    detok = IncrementalDetokenizer(tok, [im_start], skip_special_tokens=skip)
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in "".join(deltas)) == (not skip)


def test_long_output_window_stays_small(tok):
    ids = tok.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert len(detok._ids) < 80  # compacted: only a window of recent ids is kept


# ---------------------------------------------------------------- stop strings
def test_stop_string_spanning_tokens_is_trimmed(tok):
    text = "The answer is 42. Done here."
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop_strings=["42. Do"])
    deltas, matched = stream(detok, ids)
    assert matched == "42. Do"
    assert "".join(deltas) == "The answer is "
    assert detok.step(ids[:1]) == ("", None) and detok.flush() == ""


def test_no_stop_trim_keeps_the_stop_string(tok):
    ids = tok.encode("alpha beta gamma delta", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop_strings=["gam"], no_stop_trim=True)
    deltas, matched = stream(detok, ids)
    assert matched == "gam" and "".join(deltas) == "alpha beta gam"


def test_held_back_prefix_is_released_by_flush(tok):
    ids = tok.encode("one two thr", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop_strings=["three", "xyz"])
    deltas = [detok.step([i])[0] for i in ids]
    assert "".join(deltas) == "one two "  # "thr" may still become "three"
    assert detok.flush() == "thr"


def test_earliest_ending_stop_wins(tok):
    ids = tok.encode("say abcdef now", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop_strings=["abcdef", "cd"])
    deltas, matched = stream(detok, ids, chunks=[100])
    assert matched == "cd" and "".join(deltas) == "say ab"


# ---------------------------------------------------------------- properties
def _id_lists(byte_ids: list[int], special: bool):
    pool = st.one_of(st.integers(17, 49151), st.sampled_from(byte_ids),
                     *([st.integers(0, 16)] if special else []))
    return st.lists(pool, min_size=0, max_size=40)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_random_ids_random_chunks_equal_full_decode(tok, byte_ids, data):
    skip = data.draw(st.booleans())
    ids = data.draw(_id_lists(byte_ids, special=True))
    prompt = data.draw(_id_lists(byte_ids, special=True))
    chunks = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=8))
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas, _ = stream(detok, ids, chunks)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert not any(d.endswith("\ufffd") for d in deltas[:-1])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_stop_strings_stop_exactly_there(tok, byte_ids, data):
    text = data.draw(st.sampled_from(TEXTS))
    ids = tok.encode(text, add_special_tokens=False)
    # sprinkle random (byte) tokens in, so stops also land in odd text
    for _ in range(data.draw(st.integers(0, 4))):
        ids.insert(data.draw(st.integers(0, len(ids))), data.draw(st.sampled_from(byte_ids)))
    full = tok.decode(ids)
    start = data.draw(st.integers(0, len(full) - 1))
    stop = full[start:start + data.draw(st.integers(1, 6))]
    trim = data.draw(st.booleans())
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=6))
    detok = IncrementalDetokenizer(tok, [], stop_strings=[stop], no_stop_trim=not trim)
    deltas, matched = stream(detok, ids, chunks)
    at = full.find(stop)
    assert matched == stop
    assert "".join(deltas) == (full[:at] if trim else full[:at + len(stop)])
