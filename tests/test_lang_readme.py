"""Every frontend example of SGLang's README, from examples/, against `asgl serve` on the
embedded model through RuntimeEndpoint: the classic (sync) form and the `async def` form of
each. Outputs are capped small (the examples' MAX_TOKENS and a run-wide max_new_tokens) so
the whole module takes seconds per example on a CPU."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import urllib.request

import pytest

import asgl as sgl
from server_fixture import REPO, main_server  # noqa: F401

sys.path.insert(0, os.path.join(REPO, "examples"))
import chat_roles  # noqa: E402
import image_qa  # noqa: E402
import quick_start  # noqa: E402
import regex_constraints  # noqa: E402
import run_batch  # noqa: E402
import streaming  # noqa: E402
import tip_suggestion  # noqa: E402
import tool_use  # noqa: E402

pytestmark = pytest.mark.timeout(300)

SMALL = 8  # tokens per gen
FAST = {"temperature": 0, "max_new_tokens": SMALL}


@pytest.fixture(scope="module", autouse=True)
def backend(main_server):
    """README style: one default backend; the examples' outputs capped small."""
    saved = {m: m.MAX_TOKENS for m in (quick_start, tip_suggestion, image_qa,
                                        regex_constraints, chat_roles)}
    for m in saved:
        m.MAX_TOKENS = SMALL
    backend = sgl.RuntimeEndpoint(main_server.url)
    sgl.set_default_backend(backend)
    yield backend
    for m, value in saved.items():
        m.MAX_TOKENS = value


@pytest.fixture(scope="module")
def template(backend):
    """The chat template the backend resolved (the server's model's own)."""
    from asgl.lang import interpreter
    return interpreter.call_sync(backend.chat_template())


def rendered(template, messages) -> str:
    """What the model's template renders for `messages`: roles must come out exactly so."""
    from asgl.lang.chat import JinjaChatTemplate
    assert isinstance(template, JinjaChatTemplate)
    return template._render(messages, False)


def both(sync_program, async_program, **kwargs):
    """Run the classic form with fn.run and the async form with await fn.arun."""
    return sync_program.run(**kwargs), asyncio.run(async_program.arun(**kwargs))


# ---------------------------------------------------------------------- the examples


def test_multi_turn(template):
    for state in both(quick_start.multi_turn_question, quick_start.multi_turn_question_async,
                      **quick_start.QUESTIONS, **FAST):
        messages = state.messages()
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "user",
                                                 "assistant"]
        assert messages[2]["content"] == state["answer_1"] and state["answer_1"].strip()
        assert messages[4]["content"] == state["answer_2"] and state["answer_2"].strip()
        assert state.text() == rendered(template, messages)
        meta = state.get_meta_info("answer_2")
        assert 0 < meta["completion_tokens"] <= SMALL and meta["prompt_tokens"] > 20
        # the second turn's prompt extends the first: the radix cache served most of it
        assert meta["cached_tokens"] > 0


def test_tool_use_with_choices():
    question = "What is 21 * 2?"
    sync, asyn = both(tool_use.tool_use, tool_use.tool_use_async, question=question, **FAST)
    for state in (sync, asyn):
        assert state["tool"] in ("calculator", "search engine")
        meta = state.get_meta_info("tool")
        assert meta["method"] == "logprobs" and meta["choice_tokens"] == [1, 2]
        follow = "expression" if state["tool"] == "calculator" else "word"
        assert state[follow] and state.text().endswith(state[follow])
        assert f"I need to use a {state['tool']}. " in state.text()
    assert sync["tool"] == asyn["tool"]


def test_tip_suggestion_fork_computes_the_prefix_once(main_server):
    prefix = ("Here are two tips for staying healthy: 1. Balanced Diet. 2. Regular Exercise."
              "\n\n")
    n_prefix = _count_tokens(main_server, prefix)
    for program in (tip_suggestion.tip_suggestion, tip_suggestion.tip_suggestion_async):
        _flush_cache(main_server)  # nothing cached: any hit comes from this run
        state = program.run(**FAST)
        forks = state.ret_value
        for i, branch in enumerate(forks):
            assert branch.text().startswith(prefix + f"Now, expand tip {i + 1}")
            assert f"Tip {i + 1}:" + branch["detailed_tip"] + "\n" in state.text()
            # Both branches found the shared prefix cached, the first one included: it was
            # computed once, before they ran. (The last prefix token may re-tokenize with
            # the branch's text: "\n\n" + "Now" -> "\n", "\nNow".)
            cached = branch.get_meta_info("detailed_tip")["cached_tokens"]
            assert cached >= n_prefix - 1, (cached, n_prefix)
        assert state["summary"]


def test_regex(regex_supported):
    ip = re.compile(regex_constraints.IP_REGEX)
    for state in both(regex_constraints.regular_expression_gen,
                      regex_constraints.regular_expression_gen_async, max_new_tokens=24):
        assert ip.fullmatch(state["answer"]), state["answer"]


def test_character_json_regex(regex_supported):
    regex_constraints.MAX_TOKENS = 256  # the JSON needs room; small models fill it fast
    try:
        states = both(regex_constraints.character_gen, regex_constraints.character_gen_async,
                      name="Hermione Granger", temperature=0)
    finally:
        regex_constraints.MAX_TOKENS = SMALL
    for state in states:
        out = state["json_output"]
        assert re.fullmatch(regex_constraints.character_regex, out), out
        assert json.loads(out)["house"] in ("Gryffindor", "Slytherin", "Ravenclaw",
                                            "Hufflepuff")


def test_run_batch_with_progress_bar(capfd):
    states = run_batch.text_qa.run_batch(run_batch.QUESTIONS, progress_bar=True, **FAST)
    assert "3/3" in capfd.readouterr().err  # tqdm draws on stderr
    assert [s.text().split("\n")[0] for s in states] == [
        "Q: " + q["question"] for q in run_batch.QUESTIONS]
    assert all(s["answer"].strip() and "\n" not in s["answer"] for s in states)

    states = asyncio.run(run_batch.text_qa_async.arun_batch(run_batch.QUESTIONS,
                                                            progress_bar=True, **FAST))
    assert "3/3" in capfd.readouterr().err
    assert [s.ret_value for s in states] == [s["answer"] for s in states]


def test_streaming(capfd):
    text = streaming.stream_sync()
    state = run_batch.text_qa.run(question="What is the capital of France?", temperature=0.1)
    assert text.startswith("Q: What is the capital of France?\nA:")
    assert len(capfd.readouterr().out) >= len(text)
    assert state.text().startswith("Q: What is the capital of France?\nA:")
    text = asyncio.run(streaming.stream_async())
    assert text.startswith("Q: What is the capital of France?\nA:") and len(text) > 36


def test_streaming_yields_pieces_as_generated():
    question = "Write a long sentence about the sea."
    state = run_batch.text_qa.run(question=question, stream=True, **FAST)
    pieces = list(state.text_iter())
    assert state.get_meta_info("answer")["completion_tokens"] >= 3
    assert len(pieces) >= 3  # the prompt, then the answer token by token
    assert "".join(pieces) == state.text()
    again = run_batch.text_qa.run(question=question, stream=True, **FAST)
    assert "".join(again.text_iter("answer")) == again["answer"] == state["answer"]


def test_chat_roles(template):
    sync, asyn = both(chat_roles.chat_example, chat_roles.chat_example_async, **FAST)
    for state in (sync, asyn):
        messages = state.messages()
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[1]["content"] == "Question: What is the capital of France?"
        assert messages[2]["content"].startswith("Answer: ")
        assert state.text() == rendered(template, messages)
    assert asyn.ret_value == asyn.messages()[2]["content"][len("Answer: "):]


def test_image_qa_fails_clearly_on_a_text_model():
    for program in (image_qa.image_qa, image_qa.image_qa_async):
        with pytest.raises(sgl.BackendError) as info:
            program.run(image_file=image_qa.TINY_PNG, question="What is this?")
        assert info.value.status == 400 and "image_data" in str(info.value)

    @sgl.function
    def ask(s):
        s += sgl.user(sgl.image(image_qa.TINY_PNG) + "What is this?")

    content = ask.run().messages()[0]["content"]  # the state records the image
    assert content[0]["type"] == "image_url" and content[1]["text"] == "What is this?"


async def test_run_from_a_running_loop():
    """fn.run() inside async code (a notebook cell, an async server) works."""
    state = quick_start.multi_turn_question.run(**quick_start.QUESTIONS, **FAST)
    assert state["answer_2"]


# ---------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def regex_supported(main_server):
    body = {"text": "a", "sampling_params": {"max_new_tokens": 1, "regex": "b"}}
    status, answer = _post(main_server, "/generate", body)
    if status == 400 and "not supported" in answer:
        pytest.xfail(f"the server has no constrained decoding yet: {answer.strip()}")
    assert status == 200, answer


def _post(server, path: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _count_tokens(server, text: str) -> int:
    status, body = _post(server, "/generate", {"text": text,
                                               "sampling_params": {"max_new_tokens": 0}})
    assert status == 200, body
    return json.loads(body)["meta_info"]["prompt_tokens"]


def _flush_cache(server) -> None:
    server.wait_idle()
    status, body = _post(server, "/flush_cache", {})
    assert status == 200, body


def test_our_readme_frontend_section_runs(main_server):
    """The "Frontend language" section of asgl's README: each code block runs as shown
    (on this server, with shorter outputs)."""
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("## Frontend language", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2  # the classic form and the async form
    for block in blocks:
        block = re.sub(r"max_tokens=\d+", f"max_tokens={SMALL}", block)
        exec(compile(block.replace("http://localhost:30000", main_server.url), "README.md",
                     "exec"), {})
