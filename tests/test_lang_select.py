"""`select` picks the choice with the highest token-length-normalized log-probability:
scores checked against log-probabilities computed directly with HF transformers on the same
GGUF, through both asgl runtime backends (the server over HTTP, and the in-process
Runtime). Also the in-process Runtime's own behaviour: roles, streaming, images."""

from __future__ import annotations

import asyncio

import pytest
import torch

import asgl as sgl
from server_fixture import main_server  # noqa: F401
from tests.conftest import ENGINE_KV_TOKENS, reference_threads

pytestmark = pytest.mark.timeout(300)

CASES = [
    # the README's tool use: BPE merges the prefix's trailing space into the choice
    ("To answer this question: What is 2 * 123?. I need to use a ",
     ["calculator", "search engine"]),
    ("The capital of France is", [" Paris", " London", " Berlin"]),
    # one choice is a prefix of another; different token counts
    ("My favourite animal is a", [" cat", " category", " dog"]),
    ("Q: Is the sky blue?\nA:", [" Yes", " No", " Maybe not"]),
]
TOLERANCE = 5e-3  # nats per token: the same weights; seen within 1e-5 on the CPU


@sgl.function
def pick(s, prefix, choices):
    s += prefix + sgl.select("x", choices=choices)


@sgl.function
async def pick_in_chat(s, question, choices):
    s += sgl.user(question)
    with s.assistant():
        return await s.select("answer", choices=choices)


@pytest.fixture(scope="module")
def runtime():
    rt = sgl.Runtime(max_total_tokens=ENGINE_KV_TOKENS)  # sized like every test engine
    yield rt
    rt.shutdown()


@pytest.fixture(scope="module", params=["endpoint", "runtime"])
def backend(request, main_server):
    if request.param == "endpoint":
        return sgl.RuntimeEndpoint(main_server.url)
    return request.getfixturevalue("runtime")


def hf_normalized_logprobs(hf_smol, prefix: str, choices: list[str]) -> list[float]:
    """Mean log-probability of the tokens that spell each choice after `prefix`: the tokens
    of prefix + choice from the first one that differs from the prefix's tokenization."""
    model, tok = hf_smol
    prefix_ids = tok(prefix).input_ids
    scores = []
    for choice in choices:
        ids = tok(prefix + choice).input_ids
        k = 0
        while k < min(len(ids), len(prefix_ids)) and ids[k] == prefix_ids[k]:
            k += 1
        with torch.no_grad(), reference_threads():  # the engines are idle meanwhile
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        token_lps = [float(logprobs[p - 1, ids[p]]) for p in range(max(k, 1), len(ids))]
        scores.append(sum(token_lps) / len(token_lps))
    return scores


def check(ours: list[float], reference: list[float], chosen: str, choices: list[str]):
    assert ours == pytest.approx(reference, abs=TOLERANCE), (ours, reference)
    best = max(range(len(reference)), key=lambda i: reference[i])
    margin = sorted(reference)[-1] - sorted(reference)[-2]
    if margin > 2 * TOLERANCE:  # not a near-tie: the pick must be the reference's
        assert chosen == choices[best], (chosen, reference)
    assert chosen == choices[max(range(len(ours)), key=lambda i: ours[i])]


@pytest.mark.parametrize("prefix,choices", CASES)
def test_select_matches_transformers(backend, hf_smol, prefix, choices):
    state = pick.run(prefix, choices, backend=backend)
    meta = state.get_meta_info("x")
    assert meta["method"] == "logprobs"
    check(meta["normalized_logprobs"], hf_normalized_logprobs(hf_smol, prefix, choices),
          state["x"], choices)
    assert state.text() == prefix + state["x"]


def test_select_in_a_chat_turn(backend, hf_smol):
    question, choices = "Is the sky blue? Answer yes or no.", ["Yes", "No"]
    state = asyncio.run(pick_in_chat.arun(question, choices, backend=backend))
    _, tok = hf_smol
    prefix = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    check(state.get_meta_info("answer")["normalized_logprobs"],
          hf_normalized_logprobs(hf_smol, prefix, choices), state.ret_value, choices)
    assert state.messages()[-1] == {"role": "assistant", "content": state.ret_value}


# ---------------------------------------------------------------------- in-process Runtime


def test_runtime_runs_the_multi_turn_example(runtime):
    import os
    import sys
    from server_fixture import REPO
    sys.path.insert(0, os.path.join(REPO, "examples"))
    import quick_start

    kwargs = dict(quick_start.QUESTIONS, temperature=0, max_new_tokens=8, backend=runtime)
    for program in (quick_start.multi_turn_question, quick_start.multi_turn_question_async):
        saved, quick_start.MAX_TOKENS = quick_start.MAX_TOKENS, 8
        try:
            state = program.run(**kwargs)
        finally:
            quick_start.MAX_TOKENS = saved
        assert [m["role"] for m in state.messages()][-1] == "assistant"
        assert state["answer_2"].strip()
        assert state.get_meta_info("answer_2")["cached_tokens"] > 0


def test_runtime_streams_and_forks(runtime):
    @sgl.function
    def prog(s):
        s += "Here is a list of fruits: apples, pears,"
        forks = s.fork(2)
        for f in forks:
            f += sgl.gen("more", max_tokens=4)
        s += forks[0]["more"]

    state = prog.run(backend=runtime, stream=True, temperature=0)
    pieces = list(state.text_iter())
    assert "".join(pieces) == state.text() and len(pieces) >= 2


def test_runtime_refuses_images_clearly(runtime):
    @sgl.function
    def prog(s):
        s += sgl.user(sgl.image(b"\x89PNG\r\n\x1a\n") + "What is this?")
        s += sgl.assistant(sgl.gen("a", max_tokens=4))

    with pytest.raises(NotImplementedError, match="vision model"):
        prog.run(backend=runtime)
