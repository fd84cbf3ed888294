"""Constrained decoding on the engine with the embedded SmolLM2: SGLang's README regexes,
random bounded schemas and regexes at temperature 1.0, jump-forward, overlap scheduling,
retraction under memory pressure, grammars that end or cannot go on."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgl.engine.contracts.errors import InvalidRequest
from grammar_strategies import (CHARACTER_PROMPT, CHARACTER_REGEX, IP_REGEX, full_match,
                                json_schemas, regexes, validates)
from tests.conftest import make_llm, run_on

pytestmark = pytest.mark.timeout(300)

SCHEMA_PROMPT = "Answer with a JSON object.\n"


@pytest.fixture(scope="module")
def llm():
    engine = make_llm()  # overlap scheduling and jump-forward on (the defaults)
    yield engine
    engine.shutdown()


def idle_and_clean(llm) -> bool:
    """Whether the engine settles: a request finished between steps is released when
    the step still holding it has been applied."""
    async def settle():
        for _ in range(200):
            if llm.engine.scheduler.is_idle_and_clean():
                return True
            await asyncio.sleep(0.01)
        return False
    return run_on(llm, settle())


def generate_many(llm, prompts: list[str], params: list[dict]):
    async def run():
        return await asyncio.gather(*(llm.engine.generate(p, sp)
                                      for p, sp in zip(prompts, params)))
    return run_on(llm, run())


def test_readme_regexes_fully_match(llm):
    out = llm.generate("Q: What is the IP address of the Google DNS servers?\nA: ",
                       {"temperature": 0, "regex": IP_REGEX, "max_new_tokens": 32})
    assert full_match(out.text, IP_REGEX) and out.finish_reason["type"] == "stop", out.text
    names = ["Harry Potter", "Hermione Granger", "Severus Snape"]
    outs = generate_many(llm, [CHARACTER_PROMPT.format(n) for n in names],
                         [{"temperature": 0, "regex": CHARACTER_REGEX,
                           "max_new_tokens": 256}] * len(names))
    for out in outs:
        assert out.finish_reason["type"] == "stop" and full_match(out.text, CHARACTER_REGEX), \
            out.text
    assert idle_and_clean(llm)


@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(schemas=st.lists(json_schemas(max_leaves=4), min_size=8, max_size=8),
       patterns=st.lists(regexes(), min_size=6, max_size=6), seed=st.integers(0, 1000))
def test_random_grammars_at_temperature_one(llm, schemas, patterns, seed):
    params = [{"temperature": 1.0, "seed": seed + i, "max_new_tokens": 160,
               "json_schema": json.dumps(s)} for i, s in enumerate(schemas)]
    params += [{"temperature": 1.0, "seed": seed + i, "max_new_tokens": 48, "regex": r}
               for i, r in enumerate(patterns)]
    outs = generate_many(llm, [SCHEMA_PROMPT] * len(schemas) + ["Text: "] * len(patterns),
                         params)
    stopped = 0
    for out, spec in zip(outs, schemas + patterns):
        if out.finish_reason["type"] != "stop":
            assert out.finish_reason["type"] == "length"
            continue
        stopped += 1
        ok = validates(out.text, spec) if isinstance(spec, dict) else full_match(out.text, spec)
        assert ok, (out.text, spec)
    assert stopped >= 0.7 * len(outs)


def test_overlapped_masks_equal_serial_masks():
    """Greedy, no jump-forward: masks filled while the next step runs (overlap) give the
    same tokens as masks filled between steps."""
    plain = make_llm(disable_jump_forward=True, disable_overlap_schedule=True)
    try:
        regex = r'\{"name": "[A-Za-z ]{1,12}", "age": [1-9][0-9]?, "pet": "(cat|dog|owl)"\}'
        prompts = [f"Describe {n} as JSON:\n" for n in ("Ron Weasley", "Luna Lovegood")]
        params = {"temperature": 0, "regex": regex, "max_new_tokens": 48}
        base = plain.generate(prompts, params)
        plain.engine.overlap = True
        overlapped = plain.generate(prompts, params)
        assert [o.output_ids for o in overlapped] == [o.output_ids for o in base]
        assert all(full_match(o.text, regex) for o in base), [o.text for o in base]
    finally:
        plain.shutdown()


def test_jump_forward_saves_steps(llm):
    sched = llm.engine.scheduler
    before = sched.stats.num_steps
    out = llm.generate(CHARACTER_PROMPT.format("Neville Longbottom"),
                       {"temperature": 0, "regex": CHARACTER_REGEX, "max_new_tokens": 256})
    assert full_match(out.text, CHARACTER_REGEX)
    # the fixed keys are appended, not decoded: far fewer steps than tokens
    assert sched.stats.num_steps - before < 0.7 * len(out.output_ids)


def test_retraction_keeps_grammars_in_step():
    """More constrained requests than the pool holds: retracted requests resume with their
    matchers where they were, and every output still matches."""
    small = make_llm(max_total_tokens=300, max_running_requests=8, chunked_prefill_size=32)
    try:
        regex = r"(item: [0-9]{2}\n){10}"  # ~60 tokens, half of them jumped over
        prompts = [f"List {i}:\n" for i in range(8)]
        outs = small.generate(prompts, {"temperature": 1.0, "seed": 3, "max_new_tokens": 80,
                                        "regex": regex})
        assert small.engine.scheduler.stats.num_retractions > 0
        for o in outs:
            assert o.finish_reason["type"] == "stop" and full_match(o.text, regex), o.text
        assert idle_and_clean(small)
    finally:
        small.shutdown()


def test_grammars_that_end_or_cannot_continue(llm):
    out = llm.generate("Say nothing:", {"regex": "a{0}", "max_new_tokens": 8})
    assert out.text == "" and out.finish_reason["type"] == "stop"
    out = llm.generate("Say something:", {"regex": r"[^\x00-\U0010FFFF]", "max_new_tokens": 8})
    assert out.finish_reason["type"] == "abort" and "grammar" in out.finish_reason["message"]
    out = llm.generate("Greet:", {"regex": "hello world", "max_new_tokens": 8})
    assert out.text == "hello world" and out.finish_reason["type"] == "stop"
    out = llm.generate("Count:", {"regex": "[0-9]{50}", "max_new_tokens": 5,
                                  "temperature": 0})
    assert out.finish_reason["type"] == "length" and len(out.output_ids) == 5
    outs = llm.generate("Pick:", {"regex": "(yes|no|maybe)", "n": 3, "temperature": 1.0,
                                  "seed": 5})
    assert all(o.text in ("yes", "no", "maybe") for o in outs)
    assert idle_and_clean(llm)


def test_bad_grammars_are_refused_before_queueing(llm):
    for sp in ({"regex": "(("}, {"json_schema": '{"type": "array", "uniqueItems": true}'},
               {"ebnf": "root ::= nothing"}, {"regex": "a", "json_schema": "{}"}):
        with pytest.raises(InvalidRequest):
            llm.generate("x", sp)
    # (the engine's loop thread releases an earlier test's finished request just after its
    # caller was answered: give it a moment, then nothing may be queued or running)
    sched = llm.engine.scheduler
    for _ in range(50):
        if not sched.waiting and not sched.running:
            break
        time.sleep(0.02)
    assert not sched.waiting and not sched.running
