"""The grammar layer without a model: spec checks and rewrites, compiling and its cache,
matchers driven by random token walks, jump-forward re-tokenization, fuzzed bad specs."""

from __future__ import annotations

import asyncio
import json
import random
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgl.engine.grammar.backend import GrammarBackend
from asgl.engine.grammar.specs import normalize_json_schema, python_regex
from asgl.engine.scheduler.req import Req
from asgl.engine.contracts.errors import InvalidRequest
from asgl.engine.contracts.sampling_params import SamplingParams
from grammar_strategies import full_match, json_schemas, regexes, validates

pytestmark = pytest.mark.timeout(300)

EOS = 2
VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer():
    from asgl.config import EngineConfig
    from asgl.engine.loop.tokenizer import load_tokenizer
    from asgl.models.loader import resolve_model

    return load_tokenizer(resolve_model(EngineConfig()))


@pytest.fixture(scope="module")
def backend(tokenizer):
    return GrammarBackend(tokenizer, VOCAB, [EOS])


def allowed(mask_row: torch.Tensor) -> torch.Tensor:
    bits = (mask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(-1)[:VOCAB].nonzero().view(-1)


def walk(backend, compiled, tokenizer, rng: random.Random, max_tokens: int = 150,
         p_stop: float = 0.5):
    """Random tokens the grammar allows (preferring EOS when allowed): (text, finished)."""
    state = backend.new_state(compiled, jump_forward=False)
    mask = torch.empty((1, backend.words), dtype=torch.int32)
    ids = []
    for _ in range(max_tokens):
        backend.fill_rows(mask, [0], [state])
        choices = allowed(mask[0]).tolist()
        assert choices, "a live grammar must allow some token"
        token = EOS if EOS in choices and rng.random() < p_stop else rng.choice(choices)
        reason = state.accept(token)
        if reason is not None:
            assert reason.kind == "stop"
            return tokenizer.decode(ids), True
        ids.append(token)
    return tokenizer.decode(ids), False


# --------------------------------------------------------------------------- spec checks


_NS = r"\ud800-\udfff"  # surrogates, which no class may admit


@pytest.mark.parametrize("regex, expected", [
    (r"a.b", rf"a[^\n{_NS}]b"),
    (r"a\.b", r"a\.b"),
    (r"[.]x", r"[.]x"),
    (r"[].]x.", rf"[\].]x[^\n{_NS}]"),
    (r"[^].]+", rf"[^{_NS}\].]+"),
    (r"\\.", rf"\\[^\n{_NS}]"),
    (r"[^a-]", rf"[^{_NS}a\-]"),
    (r"[ -\uffff]", r"[ -\ud7ff\ue000-\uffff]"),
    (r"[\x00-\U0010FFFF]", r"[\x00-\ud7ff\ue000-\U0010FFFF]"),
    (r"\S\W\d", rf"[^\s{_NS}][^\w{_NS}]\d"),
    (r"[abc", r"[abc"),  # malformed: left for xgrammar to refuse
])
def test_python_regex(regex, expected):
    assert python_regex(regex) == expected


@pytest.mark.parametrize("schema, word", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, "oneOf"),
    ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, "allOf"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "array", "contains": {"const": 1}}, "contains"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "pattern"),
    ({"type": "string", "format": "email", "maxLength": 30}, "format"),
    ({"type": "string", "format": "credit-card"}, "credit-card"),
    ({"type": "string", "nullable": True}, "nullable"),
    ({"type": "object", "minProperties": 1}, "minProperties"),
    ({"$ref": "http://example.com/s.json"}, "$ref"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "'b'"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "exceeds"),
    ({"type": "blob"}, "type"),
    ({"if": {"type": "integer"}, "then": {"minimum": 1}}, "'if'"),
])
def test_unenforceable_keywords_are_refused(schema, word):
    with pytest.raises(InvalidRequest) as err:
        normalize_json_schema(schema)
    assert word in str(err.value)


def test_rewrites_keep_meaning():
    s = normalize_json_schema({"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 4}, "o": {"type": "object"},
        "p": {"type": "string", "pattern": "^a.c$"}}})
    assert s["properties"]["s"] == {"type": "string",
                                "pattern": '^[^"\\\\\\x00-\\x1f\\ud800-\\udfff]{0,4}$'}
    assert s["properties"]["o"]["additionalProperties"] is True  # any object, not only {}
    assert s["properties"]["p"]["pattern"] == "^a[^\\n\\ud800-\\udfff]c$"


def test_compile_errors_are_400s(backend):
    cases = [("regex", "(ab"), ("regex", r"(a)\1"), ("json_schema", "{not json"),
             ("json_schema", "[1, 2]"), ("ebnf", "root ::= undefined_rule"),
             ("structural_tag", '{"type": "structural_tag", "format": {"type": "nope"}}'),
             ("regex", "a" * 200_000)]
    for kind, spec in cases:
        with pytest.raises(InvalidRequest) as err:
            backend.compile_sync(kind, spec)
        assert err.value.param == kind and "/project/" not in str(err.value)


def test_cache_is_bounded_by_entries_and_bytes(tokenizer):
    b = GrammarBackend(tokenizer, VOCAB, [EOS], max_entries=4)
    for i in range(12):
        b.compile_sync("regex", f"[a-z]{{{i + 1}}}")
        assert b.cache_info()["entries"] <= 4
    first = b.compile_sync("regex", "[a-z]{12}")
    assert b.compile_sync("regex", "[a-z]{12}") is first  # a hit
    b = GrammarBackend(tokenizer, VOCAB, [EOS], max_bytes=1)
    b.compile_sync("regex", "x+")
    assert b.cache_info()["bytes"] <= 1


def test_async_compile_dedups_and_caches_errors(backend):
    async def run():
        spec = json.dumps({"type": "object", "properties": {"q": {"type": "integer"}}})
        a, b = await asyncio.gather(backend.compile("json_schema", spec),
                                    backend.compile("json_schema", spec))
        assert a is b
        for _ in range(2):  # the second refusal comes from the cache
            with pytest.raises(InvalidRequest):
                await backend.compile("regex", "((")
        assert not backend.cache_info()["compiling"]
    asyncio.run(run())


# --------------------------------------------------------------------------- random walks


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=json_schemas(), seed=st.integers(0, 2**16))
def test_random_walks_validate_against_schemas(backend, tokenizer, schema, seed):
    compiled = backend.compile_sync("json_schema", json.dumps(schema))
    text, finished = walk(backend, compiled, tokenizer, random.Random(seed), max_tokens=300,
                          p_stop=1.0)
    if finished:
        assert validates(text, schema), (text, schema)


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(regex=regexes(), seed=st.integers(0, 2**16))
def test_random_walks_match_regexes(backend, tokenizer, regex, seed):
    compiled = backend.compile_sync("regex", regex)
    text, finished = walk(backend, compiled, tokenizer, random.Random(seed), p_stop=0.3)
    assert finished
    assert full_match(text, regex), (text, regex)


@pytest.mark.parametrize("regex", [r"[^b]{4,10}", r".{2,10}", r"[^\n,][^\n,]{1,3}"])
def test_eos_waits_for_a_repetitions_minimum(backend, regex):
    # xgrammar 0.2.9 allowed EOS at the start of these (a regression; pyproject refuses it)
    state = backend.new_state(backend.compile_sync("regex", regex), jump_forward=False)
    mask = torch.empty((1, backend.words), dtype=torch.int32)
    backend.fill_rows(mask, [0], [state])
    assert EOS not in allowed(mask[0]).tolist()


@pytest.mark.parametrize("regex", [r"[a-z]x [^\n,]\.", r"x .\.", r"x \S\.", r"x [ -\uffff]\."])
def test_classes_never_admit_surrogates(backend, tokenizer, regex):
    # byte tokens can spell a surrogate's 3-byte form (ED A0..BF xx), which is not UTF-8
    compiled = backend.compile_sync("regex", regex)
    for seed in range(400):
        text, finished = walk(backend, compiled, tokenizer, random.Random(seed), p_stop=0.3)
        assert finished and full_match(text, regex) and "\ufffd" not in text, (seed, text)


def _byte_token(tokenizer, byte: int) -> int:
    """The byte-level BPE token of one raw byte (GPT-2's printable byte alphabet)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    char = chr(byte) if byte in printable else chr(256 + sorted(
        set(range(256)) - set(printable)).index(byte))
    return tokenizer.convert_tokens_to_ids(char)


@pytest.mark.parametrize("schema", [{"type": "string"},
                                    {"type": "object", "properties": {"a": {"type": "string"}}}])
def test_json_strings_never_admit_surrogates(backend, tokenizer, schema):
    # ED A0..BF starts a surrogate's 3-byte form; ED 80..9F is valid UTF-8 (U+D000-U+D7FF)
    state = backend.new_state(backend.compile_sync("json_schema", json.dumps(schema)),
                              jump_forward=False)
    mask = torch.empty((1, backend.words), dtype=torch.int32)
    prefix = b'"' if schema["type"] == "string" else b'{"a": "'
    for byte in prefix + b"\xed":
        assert state.accept(_byte_token(tokenizer, byte)) is None
    backend.fill_rows(mask, [0], [state])
    ok = set(allowed(mask[0]).tolist())
    assert _byte_token(tokenizer, 0x9F) in ok
    assert not ok & {_byte_token(tokenizer, b) for b in range(0xA0, 0xC0)}


def test_length_bounded_strings_stay_valid_json(backend, tokenizer):
    # xgrammar's own maxLength strings admit raw control characters; ours must not
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}},
              "required": ["s"]}
    compiled = backend.compile_sync("json_schema", json.dumps(schema))
    for seed in range(30):
        text, finished = walk(backend, compiled, tokenizer, random.Random(seed), p_stop=1.0)
        assert finished and validates(text, schema), text


def test_unsatisfiable_and_empty_grammars(backend):
    from asgl.engine.grammar.backend import GrammarStep

    reqs = []
    for regex in (r"[^\x00-\U0010FFFF]", r"a{0}", r"ab"):
        r = Req(rid=regex, prompt_ids=[1], sampling=SamplingParams(), seed=0)
        r.grammar = backend.new_state(backend.compile_sync("regex", regex), jump_forward=False)
        reqs.append(r)
    step = GrammarStep(backend, reqs, pinned=False)
    ended = {r.rid: reason for r, reason in step.fill()}
    assert ended[r"[^\x00-\U0010FFFF]"].kind == "abort"  # nothing can ever be produced
    assert ended[r"a{0}"].kind == "stop"  # complete: only EOS could follow
    assert "ab" not in ended
    assert (step.bitmask[:2] == -1).all()  # rows of ended requests stay samplable


def test_bitmask_kernels_agree():
    from asgl.engine.grammar.backend import apply_bitmask, apply_bitmask_torch

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=gen)
    mask = torch.randint(-2**31, 2**31 - 1, (5, 32), generator=gen, dtype=torch.int64)
    mask = mask.to(torch.int32)
    a, b = logits.clone(), logits.clone()
    apply_bitmask(a, mask)
    apply_bitmask_torch(b, mask)
    assert torch.equal(a, b) and torch.isinf(a).any() and torch.isfinite(a).any()


# --------------------------------------------------------------------------- jump-forward


class _Sink:
    collect = False

    def __init__(self):
        self.chunks = []

    def put(self, chunk):
        self.chunks.append(chunk)


def _jump_req(backend, tokenizer, regex, prompt, output_text):
    from asgl.engine.loop.detokenizer import IncrementalDetokenizer

    prompt_ids = tokenizer.encode(prompt)
    req = Req(rid="r", prompt_ids=prompt_ids, sampling=SamplingParams(max_new_tokens=200),
              seed=0)
    req.grammar = backend.new_state(backend.compile_sync("regex", regex), jump_forward=True)
    req.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    req.sink = _Sink()
    for t in tokenizer.encode(output_text, add_special_tokens=False) if output_text else []:
        assert req.grammar.accept(t) is None
        req.output_ids.append(t)
        req.detok.step([t])
    return req


def test_forced_text_with_multibyte_characters(backend, tokenizer):
    """Forced strings are bytes to xgrammar: after part of a character is accepted the rest
    is no text (found by fuzzing the server: this was a 500)."""
    from asgl.engine.loop.jump_forward import JumpForward

    req = _jump_req(backend, tokenizer, "0\x80\u00e9\U0001F600", "Say:", "")
    byte_tokens = tokenizer.encode("0\x80", add_special_tokens=False)
    assert len(byte_tokens) > 2  # U+0080 is two byte tokens here: stop between them
    for t in byte_tokens[:-1]:
        assert req.grammar.accept(t) is None
        req.output_ids.append(t)
    assert req.grammar.jump_string() == ""  # a partial character: nothing to jump yet
    req.grammar.accept(byte_tokens[-1])
    req.output_ids.append(byte_tokens[-1])
    JumpForward(tokenizer, backend, context_len=1024)(req)
    assert tokenizer.decode(req.output_ids) == "0\x80\u00e9\U0001F600"


def test_jump_forward_retokenizes_the_boundary(backend, tokenizer):
    from asgl.engine.loop.jump_forward import JumpForward

    jf = JumpForward(tokenizer, backend, context_len=1024)
    regex = r'\{"name": "[a-z]{1,8}", "house": "(Gryffindor|Slytherin)"\}'
    # the model wrote `"` as a token of its own; canonically `",` is one token
    req = _jump_req(backend, tokenizer, regex, "Q:", '{"name": "harry')
    quote = tokenizer.encode('"', add_special_tokens=False)
    req.grammar.accept(quote[0])
    req.output_ids += quote
    req.detok.step(quote)
    before = list(req.output_ids)
    keep = jf(req)
    text = tokenizer.decode(req.output_ids)
    assert text == '{"name": "harry", "house": "'
    assert req.output_ids == tokenizer.encode(text, add_special_tokens=False)  # canonical
    assert keep == len(req.prompt_ids) + len(before) - 1  # the lone `"` was replaced
    assert req.sink.chunks[-1].text == ', "house": "'  # the consumer gets the new text only
    # the matcher follows the new tokens: it now expects a house
    assert req.grammar.matcher.accept_string("Slytherin") and req.grammar.jump_string() == '"}'


def test_jump_forward_at_the_start_and_to_the_end(backend, tokenizer):
    from asgl.engine.loop.jump_forward import JumpForward

    jf = JumpForward(tokenizer, backend, context_len=1024)
    req = _jump_req(backend, tokenizer, r"hello world", "Say:", "")
    assert jf(req) == len(req.prompt_ids)
    assert tokenizer.decode(req.output_ids) == "hello world"
    assert req.finish_reason is not None and req.finish_reason.kind == "stop"


# --------------------------------------------------------------------------- fuzzing


_junk = st.text(max_size=40) | st.sampled_from([
    "(", ")", "[", "]", "{", "}", "\\", "*", "+?", "(?<=a)", "a{3,1}", "[z-a]", "\\p{L}",
    "(?P<n>a)", "a**", "{", "root ::= ", "::=", "\x00", "\ud7ff", "a{99999999}"])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["regex", "ebnf", "json_schema", "structural_tag"]),
       parts=st.lists(_junk, max_size=4))
def test_fuzzed_specs_only_raise_invalid_request(backend, kind, parts):
    try:
        backend.compile_sync(kind, "".join(parts))
    except InvalidRequest:
        pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "properties", "items", "enum", "const", "required",
                         "minimum", "maxLength", "pattern", "anyOf", "$ref", "format",
                         "additionalProperties", "prefixItems", "minItems", "x"]),
        inner, max_size=4),
    max_leaves=12)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=_json_values)
def test_fuzzed_schemas_only_raise_invalid_request(backend, schema):
    try:
        backend.compile_sync("json_schema", json.dumps(schema))
    except InvalidRequest as e:
        assert e.param == "json_schema" and not re.search(r"\.cc:\d+", str(e))


@pytest.mark.parametrize("n", [2, 6])  # below and above the batched filler's row count
def test_a_failing_matcher_ends_only_its_request(backend, n):
    from asgl.engine.grammar.backend import GrammarStep

    class _Broken:  # a matcher whose mask filling raises (an xgrammar bug, say)
        def __init__(self, matcher):
            self._m = matcher

        def __getattr__(self, name):
            if name.startswith("_"):  # the batched filler reads xgrammar's handle: none here
                raise AttributeError(name)
            return getattr(self._m, name)

        def fill_next_token_bitmask(self, *args):
            raise RuntimeError("matcher state corrupted")

    reqs = []
    for i in range(n):
        r = Req(rid=f"r{i}", prompt_ids=[1], sampling=SamplingParams(), seed=0)
        r.grammar = backend.new_state(backend.compile_sync("regex", r"ab+"), jump_forward=False)
        reqs.append(r)
    reqs[1].grammar.matcher = _Broken(reqs[1].grammar.matcher)
    reference = torch.empty((1, backend.words), dtype=torch.int32)
    backend.fill_rows(reference, [0], [reqs[0].grammar])
    step = GrammarStep(backend, reqs, pinned=False)
    ended = {r.rid: reason for r, reason in step.fill()}
    assert list(ended) == ["r1"] and ended["r1"].kind == "abort"
    assert "grammar error" in ended["r1"].message
    assert (step.bitmask[1] == -1).all()  # its row stays samplable
    for row in [0, *range(2, n)]:  # the others keep their real masks
        assert torch.equal(step.bitmask[row], reference[0])
