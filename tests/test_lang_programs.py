"""SGLang's frontend test programs (upstream `python/sglang/test/test_programs.py`), written
again here with the same program logic, on the embedded SmolLM2-135M through the in-process
`Runtime` and `RuntimeEndpoint` against `asgl serve` (and, where cheap, the OpenAI backend on
its `/v1`). Each API the issue added is also run in the `async def` form.

ADAPTED marks what a 135M model cannot know (upstream asserts facts: 24 hours, 257 * 983,
"Noah"): there the test checks the mechanism (the type parses, the tool's result is what the
program computed from the generated expression, the joined text holds every branch) instead.
Token counts are small to keep the file fast on two CPU cores.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

import pytest

import asgl.lang as sgl
from asgl.lang import choices as choices_mod
from asgl.lang.backends.base import BackendError
from asgl.lang.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR
from server_fixture import main_server  # noqa: F401
from tests.conftest import ENGINE_KV_TOKENS

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def runtime():
    rt = sgl.Runtime(max_total_tokens=ENGINE_KV_TOKENS)
    yield rt
    rt.shutdown()


@pytest.fixture(scope="module", params=["runtime", "endpoint"])
def backend(request, main_server):
    if request.param == "endpoint":
        return sgl.RuntimeEndpoint(main_server.url)
    return request.getfixturevalue("runtime")


@pytest.fixture(params=["runtime", "endpoint", "openai"])
def default_backend(request, main_server):
    """SGLang programs call `fn.run()` / `fn()` without `backend=`: each upstream program
    runs on the in-process Runtime, RuntimeEndpoint, and OpenAI on `asgl serve`'s /v1."""
    if request.param == "openai":
        backend = request.getfixturevalue("openai_backend")
    elif request.param == "endpoint":
        backend = sgl.RuntimeEndpoint(main_server.url)
    else:
        backend = request.getfixturevalue("runtime")
    saved = sgl.global_config.default_backend
    sgl.set_default_backend(backend)
    yield backend
    sgl.global_config.default_backend = saved


@pytest.fixture(scope="module")
def openai_backend(main_server):
    return sgl.OpenAI("default", base_url=main_server.base_url, api_key="EMPTY")


# ---------------------------------------------------------------------- upstream programs
@sgl.function
def few_shot_qa(s, question):
    s += "The following are questions with answers.\n\n"
    s += "Q: What is the capital of France?\nA: Paris\n"
    s += "Q: What is the capital of Germany?\nA: Berlin\n"
    s += "Q: What is the capital of Italy?\nA: Rome\n"
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", stop="\n", temperature=0, max_tokens=8)


def test_few_shot_qa(default_backend):
    ret = few_shot_qa.run(question="What is the capital of the United Kingdom?")
    # ADAPTED: upstream's US/Japan/China need more than 135M parameters; London it knows
    assert "london" in ret["answer"].lower(), ret.text()
    rets = few_shot_qa.run_batch([{"question": "What is the capital of the United Kingdom?"},
                                  {"question": "What is the capital of Spain?"}],
                                 temperature=0)
    assert rets[0]["answer"] == ret["answer"] and all("\n" not in r["answer"] for r in rets)


@sgl.function
def decode_int(s):
    s += "The number of hours in a day is " + sgl.gen_int("hours") + "\n"
    s += "The number of days in a year is " + sgl.gen_int("days") + "\n"


def test_decode_int(default_backend):
    ret = decode_int.run(temperature=0.1, max_new_tokens=8)
    # ADAPTED: upstream asserts 24 and 365; the regex guarantees an int either way
    assert re.fullmatch(r"[-+]?\d+", ret["hours"]) and re.fullmatch(r"[-+]?\d+", ret["days"])
    assert ret.text().startswith("The number of hours in a day is " + ret["hours"] + "\n")
    assert ret.get_meta_info("hours")["dtype_method"] == "regex"


@sgl.function
def decode_json_regex(s):
    s += "Generate a JSON object to describe the basic city information of Paris.\n"
    s += "Here are the JSON object:\n"
    with s.var_scope("json_output"):
        s += "{\n"
        s += '  "name": ' + sgl.gen(regex=REGEX_STR, max_tokens=8) + ",\n"
        s += '  "population": ' + sgl.gen(regex=REGEX_INT, stop=[" ", "\n"],
                                          max_tokens=8) + ",\n"
        s += '  "area": ' + sgl.gen(regex=REGEX_INT, stop=[" ", "\n"], max_tokens=8) + ",\n"
        s += '  "latitude": ' + sgl.gen(regex=REGEX_FLOAT, stop=[" ", "\n"],
                                        max_tokens=8) + "\n"
        s += "}"


@sgl.function
def decode_json(s):
    s += "Generate a JSON object to describe the basic city information of Paris.\n"
    with s.var_scope("json_output"):
        s += "{\n"
        s += '  "name": ' + sgl.gen_string(max_tokens=8) + ",\n"
        s += '  "population": ' + sgl.gen_int(max_tokens=8) + ",\n"
        s += '  "area": ' + sgl.gen(dtype=int, max_tokens=8) + ",\n"
        s += '  "country": ' + sgl.gen_string(max_tokens=8) + ",\n"
        s += '  "timezone": ' + sgl.gen(dtype=str, max_tokens=8) + "\n"
        s += "}"


@pytest.mark.parametrize("program", [decode_json_regex, decode_json])
def test_decode_json(default_backend, program):
    ret = program.run(temperature=0)
    obj = json.loads(ret["json_output"])
    assert isinstance(obj["name"], str) and isinstance(obj["population"], int)
    # the scope holds exactly what was written inside it
    assert ret.text().endswith(ret["json_output"]) and ret["json_output"].startswith("{\n")


def calculate(expression: str) -> str:
    # the upstream program's tool; only arithmetic reaches eval
    if not re.fullmatch(r"[\d\s+\-*/().]+", expression):
        return "error"
    return str(eval(expression))


@sgl.function
def tool_use(s, lhs, rhs):
    s += ("Please perform computations using a calculator. You can use calculate(expression) "
          "to get the results.\n")
    s += "For example,\ncalculate(1+2)=3\ncalculate(3*4)=12\n"
    s += "Question: What is the product of " + str(lhs) + " and " + str(rhs) + "?\n"
    s += "Answer: The answer is calculate(" + sgl.gen("expression", stop=")",
                                                      max_tokens=12) + ") = "
    with s.var_scope("answer"):
        s += calculate(s["expression"])


def test_tool_use_direct_call(default_backend):
    ret = tool_use(lhs=257, rhs=983, temperature=0)  # a direct call runs the program
    assert isinstance(ret, sgl.ProgramState)
    # ADAPTED: upstream asserts 257 * 983; the model's expression may differ, the tool's
    # result is checked against it
    assert ret["answer"] == calculate(ret["expression"]), ret.text()
    assert "257" in ret["expression"], ret.text()


@sgl.function
def parallel_encoding(s, question, context_0, context_1, context_2):
    s += "USER: I will ask a question based on some statements.\n"
    s += "ASSISTANT: Sure. I will give the answer.\n"
    s += "USER: Please memorize these statements.\n"
    contexts = [context_0, context_1, context_2]
    forks = s.fork(len(contexts))
    forks += lambda i: f"Statement {i}: " + contexts[i] + "\n"
    forks.join(mode="concate_and_append")
    s += "Now, please answer the following question. Do not list options."
    s += "\nQuestion: " + question + "\n"
    s += "ASSISTANT:" + sgl.gen("answer", max_tokens=12)


CONTEXTS = dict(context_0="Ethan is the father of Liam.",
                context_1="Noah is the father of Julian.",
                context_2="Oliver is the father of Carlos.")


def test_parallel_encoding(default_backend):
    ret = parallel_encoding.run(question="Who is the father of Julian?", temperature=0,
                                **CONTEXTS)
    statements = "".join(f"Statement {i}: {c}\n" for i, c in enumerate(CONTEXTS.values()))
    assert "memorize these statements.\n" + statements + "Now, please" in ret.text()
    # ADAPTED: upstream asserts "Noah" in the answer (the 135M model answers nothing
    # here); the answer must be the one the same text written without forks gets

    @sgl.function
    def sequential(s, question):
        s += ret.text()[:-len("ASSISTANT:" + ret["answer"])] + "ASSISTANT:"
        s += sgl.gen("answer", max_tokens=12)

    assert sequential.run(question="", temperature=0)["answer"] == ret["answer"]


@sgl.function
def qa(s, question):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=12))


def test_stream_direct_call(default_backend):
    ret = qa(question="Name a fruit.", stream=True, temperature=0)
    out = "".join(ret.text_iter())
    assert out == ret.text() and ret["answer"] and ret["answer"] in out
    assert ret.messages()[-1] == {"role": "assistant", "content": ret["answer"]}
    ret = qa(question="Name a fruit.", stream=True, temperature=0)
    assert "".join(ret.text_iter("answer")) == ret["answer"]


@sgl.function
def dtype_gen(s):
    s += "Q: What is the full name of DNS?\n"
    s += "A: The full nams is " + sgl.gen("str_res", dtype=str, stop="\n") + "\n"
    s += "Q: Which year was DNS invented?\n"
    s += "A: " + sgl.gen("int_res", dtype=int) + "\n"
    s += "Q: What is the value of pi?\n"
    s += "A: " + sgl.gen("float_res", dtype=float) + "\n"
    s += "Q: Is the sky blue?\n"
    s += "A: " + sgl.gen("bool_res", dtype=bool) + "\n"


def test_dtype_gen(default_backend):
    state = dtype_gen.run(temperature=0, max_new_tokens=10)
    state["int_res"] = int(state["int_res"])
    state["float_res"] = float(state["float_res"])
    assert state["bool_res"] in ("True", "False")
    assert re.fullmatch(REGEX_STR, state["str_res"])
    assert isinstance(state["int_res"], int)  # set_var after the run


def hellaswag_items() -> tuple[str, list[dict], list[int]]:
    # ADAPTED: upstream downloads HellaSwag (200 questions, 20 shots); a few hand-written
    # items in its format keep the test offline and fast
    shots = ("Cooking: A man cracks two eggs into a bowl. He whisks them with a fork.\n\n"
             "Swimming: A girl stands at the edge of the pool. She dives into the water.\n\n")
    items = [("Running: A woman ties her shoes at the start line. She",
              [" eats the shoes.", " starts running down the track."], 1),
             ("Painting: A boy dips a brush in red paint. He",
              [" paints the wall red.", " swims across the lake."], 0),
             ("Sleeping: A baby yawns in the crib. She",
              [" drives a truck.", " falls asleep."], 1)]
    return shots, [{"question": q, "choices": c} for q, c, _ in items], [a for *_, a in items]


def test_hellaswag_select_generator_style(default_backend):
    shots, arguments, labels = hellaswag_items()

    @sgl.function
    def few_shot_hellaswag(s, question, choices):
        s += shots + question
        s += sgl.select("answer", choices=choices)

    rets = few_shot_hellaswag.run_batch(arguments, temperature=0, num_threads=4,
                                        generator_style=True)
    assert not isinstance(rets, list)
    preds = [arguments[i]["choices"].index(r["answer"]) for i, r in enumerate(rets)]
    assert len(preds) == 3 and sum(p == a for p, a in zip(preds, labels)) >= 2, preds


def test_regex(default_backend):
    regex = r"((25[0-5]|2[0-4]\d|[01]?\d\d?).){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"

    @sgl.function
    def regex_gen(s):
        s += "Q: What is the IP address of the Google DNS servers?\n"
        s += "A: " + sgl.gen("answer", temperature=0, regex=regex, max_tokens=16)

    assert re.fullmatch(regex, regex_gen.run()["answer"])


# ---------------------------------------------------------------------- logprobs
@sgl.function
def with_logprobs(s):
    s += "The capital of France is"
    s += sgl.gen("x", max_tokens=4, temperature=0, return_logprob=True, top_logprobs_num=3,
                 logprob_start_len=0, return_text_in_logprobs=True)


def test_gen_logprobs_meta(backend):
    state = with_logprobs.run(backend=backend)
    meta = state.get_meta_info("x")
    out, top = meta["output_token_logprobs"], meta["output_top_logprobs"]
    assert len(out) == meta["completion_tokens"] == len(top) > 0
    assert all(lp <= 0 and isinstance(tid, int) for lp, tid, _ in out)
    assert "".join(t for *_, t in out) == state["x"]
    for (lp, tid, _), row in zip(out, top):  # greedy: the chosen token is the top one
        assert len(row) == 3 and row[0][1] == tid and math.isclose(row[0][0], lp, abs_tol=1e-4)
    inp = meta["input_token_logprobs"]
    assert len(inp) == meta["prompt_tokens"] and inp[0][0] is None
    assert all(e[0] <= 0 for e in inp[1:])


def test_stream_logprobs(backend):
    state = with_logprobs.run(backend=backend, stream=True)
    pieces = list(state.text_iter("x"))
    meta = state.get_meta_info("x")
    assert "".join(pieces) == state["x"]
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"] > 0
    plain = with_logprobs.run(backend=backend).get_meta_info("x")
    assert [e[1] for e in meta["output_token_logprobs"]] == \
        [e[1] for e in plain["output_token_logprobs"]]


def test_openai_logprobs_and_refusals(openai_backend):
    @sgl.function
    def prog(s):
        s += "The capital of France is"
        s += sgl.gen("x", max_tokens=3, temperature=0, return_logprob=True)

    meta = prog.run(backend=openai_backend).get_meta_info("x")
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"] > 0
    with pytest.raises(BackendError, match="logprob_start_len"):
        with_logprobs.run(backend=openai_backend).sync()

    anthropic = sgl.Anthropic("claude", api_key="x", base_url="http://127.0.0.1:9")
    with pytest.raises(BackendError, match="return_logprob"):
        anthropic.build_request(sgl.backends.base.Prompt("hi", []),
                                {"max_new_tokens": 1, "return_logprob": True})


# ---------------------------------------------------------------------- choices_method
def entries(*lps: float) -> list[list]:
    return [[lp, i, None] for i, lp in enumerate(lps)]


def test_choices_methods_on_hand_built_logprobs():
    choices = ["a", "ab", "c"]
    inputs = [entries(-1.0), entries(-1.0, -0.1), entries(-0.5, -2.0)]
    means = [-1.0, -0.55, -1.25]
    common = dict(choices=choices, normalized_prompt_logprobs=means,
                  input_token_logprobs=inputs, output_token_logprobs=[[], [], []])
    # token_length_normalized: the best mean ("ab")
    assert choices_mod.token_length_normalized.decide(**common)[0] == 1
    # greedy: "c" has the best first token (-0.5)
    index, meta = choices_mod.greedy_token_selection.decide(**common)
    assert index == 2 and meta["greedy_logprob_matrix"][0] == [-1.0, -1.0]
    # a tie on the first token goes to the second: "a" is padded with its mean (-1.0)
    tie = dict(common, input_token_logprobs=[entries(-1.0), entries(-1.0, -0.1),
                                             entries(-3.0, 0.0)])
    assert choices_mod.greedy_token_selection.decide(**tie)[0] == 1
    # unconditional: "a" gains most over its unconditional likelihood
    uncond = [entries(None), entries(None, -0.1), entries(None, -2.0)]
    index, meta = choices_mod.unconditional_likelihood_normalized.decide(
        **common, unconditional_token_logprobs=uncond)
    assert meta["normalized_unconditional_prompt_logprobs"] == [-1.0, -0.5, -0.25]
    assert index == 2
    with pytest.raises(ValueError):
        choices_mod.unconditional_likelihood_normalized.decide(**common)
    assert choices_mod.resolve("greedy_token_selection") is choices_mod.greedy_token_selection


@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection",
                                    "unconditional_likelihood_normalized"])
def test_choices_method_end_to_end(backend, method):
    @sgl.function
    async def pick(s):
        s += "The capital of France is"
        return await s.select("city", choices=[" Paris", " London", " a city"],
                              choices_method=method)

    state = pick.run(backend=backend)
    meta = state.get_meta_info("city")
    m = choices_mod.resolve(method)
    expected, _ = m.decide(
        choices=[" Paris", " London", " a city"],
        normalized_prompt_logprobs=meta["normalized_prompt_logprobs"],
        input_token_logprobs=meta["input_token_logprobs"],
        output_token_logprobs=meta["output_token_logprobs"],
        unconditional_token_logprobs=meta.get("unconditional_token_logprobs"))
    assert state["city"] == [" Paris", " London", " a city"][expected]
    assert meta["choices_method"] == method
    if m.needs_unconditional:  # the first token of each choice has no context
        assert all(row[0][0] is None for row in meta["unconditional_token_logprobs"])
    assert [len(r) for r in meta["input_token_logprobs"]] == meta["choice_tokens"]


def test_choices_method_refused_without_scores(openai_backend):
    @sgl.function
    def pick(s):
        s += "Yes or no?" + sgl.select("x", choices=["yes", "no"],
                                      choices_method=sgl.greedy_token_selection)

    with pytest.raises(BackendError, match="greedy_token_selection"):
        pick.run(backend=openai_backend).sync()


# ---------------------------------------------------------------------- async forms
def test_async_forms(backend):
    @sgl.function
    async def prog(s, contexts):
        s += "Facts:\n"
        forks = s.fork(len(contexts))
        forks += lambda i: contexts[i] + "\n"
        await forks.join(mode="concate_and_append")
        async with s.var_scope("record"):
            s += "Hours in a day: "
            hours = await s.gen_int("hours", max_tokens=4)
            s += "\nName: "
            await s.gen_string("name", max_tokens=6)
        branch = s.fork(2)
        branch += [sgl.gen("b", max_tokens=2), sgl.gen("b", max_tokens=3)]
        await branch.join()  # gather_variable: the branches' new variables, as lists
        return hours, s["record"], s["b"]

    async def main():
        state = await prog(contexts=["Grass is green.", "Snow is white."], backend=backend,
                           temperature=0)
        batch = [s async for s in prog.arun_batch(
            [{"contexts": ["a."]}, {"contexts": ["b."]}], backend=backend, temperature=0,
            generator_style=True)]
        return state, batch

    state, batch = asyncio.run(main())
    hours, record, b = state.ret_value
    assert state.text().startswith("Facts:\nGrass is green.\nSnow is white.\nHours in a day: ")
    assert re.fullmatch(r"[-+]?\d+", hours) and record.startswith("Hours in a day: " + hours)
    assert record.endswith(state["name"]) and re.fullmatch(REGEX_STR, state["name"])
    assert isinstance(b, list) and len(b) == 2
    assert [s.text().split("\n")[1] for s in batch] == ["a.", "b."]


def test_program_composition_still_works(backend):
    @sgl.function
    def inner(s, x):
        s += "x=" + x + ";"

    @sgl.function
    def outer(s):
        inner(s, "1")
        inner(s, x="2")

    assert outer.run(backend=backend).text() == "x=1;x=2;"


# ---------------------------------------------------------------------- API speculation
SPEC_HEAD = ("Construct a character within the following format:\n"
             "Name: Steve Jobs.\nBirthday: February 24, 1955.\nJob: Apple CEO.\n"
             "\nPlease generate new Name, Birthday and Job.\n")


def character(s):
    s += SPEC_HEAD
    s += "Name:" + sgl.gen("name", stop="\n") + "\nBirthday:" + sgl.gen("birthday", stop="\n")
    s += "\nJob:" + sgl.gen("job", stop="\n") + "\n"


def test_completion_speculative(openai_backend):
    spec = sgl.function(num_api_spec_tokens=64)(character)
    no_spec = sgl.function(character)
    usage = openai_backend.token_usage
    usage.reset()
    a = spec.run(backend=openai_backend, temperature=0, max_new_tokens=16)
    with_spec, calls_spec = usage.prompt_tokens, usage.completion_tokens
    usage.reset()
    b = no_spec.run(backend=openai_backend, temperature=0, max_new_tokens=16)
    assert with_spec < usage.prompt_tokens, (with_spec, usage.prompt_tokens)
    assert calls_spec > 0 and a["name"] == b["name"]
    assert a.get_meta_info("name")["speculative"] == "call"


def test_chat_completion_speculative(openai_backend):
    @sgl.function(num_api_spec_tokens=32)
    def gen_character_spec(s):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user("Construct a character within the following format:")
        s += sgl.assistant("Name: Steve Jobs.\nBirthday: February 24, 1955.\nJob: Apple CEO.\n")
        s += sgl.user("Please generate new Name, Birthday and Job.\n")
        s += sgl.assistant("Name:" + sgl.gen("name", stop="\n") + "\nBirthday:"
                           + sgl.gen("birthday", stop="\n") + "\nJob:" + sgl.gen("job", stop="\n"))

    usage = openai_backend.token_usage
    usage.reset()
    state = gen_character_spec.run(backend=openai_backend, temperature=0)
    meta = state.get_meta_info("name")
    # one chat call wrote the whole turn (the chat API cannot continue "Name:" otherwise)
    assert meta["speculative"] == "chat" and usage.prompt_tokens == meta["prompt_tokens"]
    turn = state.messages()[-1]["content"]
    assert turn == ("Name:" + state["name"] + "\nBirthday:" + state["birthday"] + "\nJob:"
                    + state["job"])
    assert all("\n" not in state[k] for k in ("name", "birthday", "job"))

    async def in_async():  # the async form: the same turn, awaited
        return await gen_character_spec.arun(backend=openai_backend, temperature=0)

    assert asyncio.run(in_async())["name"] == state["name"]


def test_dtype_post_parse_on_openai(openai_backend):
    backend = sgl.OpenAI("default", base_url=openai_backend.base_url, supports_regex=False)

    @sgl.function
    def prog(s):
        s += "The number of hours in a day is" + sgl.gen_int("hours", max_tokens=6)

    state = prog.run(backend=backend, temperature=0)
    assert state.get_meta_info("hours")["dtype_method"] == "post_parse"
    assert re.fullmatch(r"[-+]?\d+", state["hours"])


# ---------------------------------------------------------------------- shared prefix
def test_shared_prefix_hint(runtime):
    def asker(tag: str):
        # a preamble no earlier request has put in the radix cache
        preamble = "".join(f"Fact {tag}{i}: {tag} number {i} is written as {i}.\n"
                           for i in range(20))

        @sgl.function
        def ask(s, n):
            s += preamble + f"Question {n}: which number comes after {n}?" + sgl.gen(
                "a", max_tokens=2)
        return ask, len(runtime.engine.tokenize(preamble))

    batch = [{"n": i} for i in range(8)]
    saved = sgl.global_config.enable_precache_with_tracing
    try:
        sgl.global_config.enable_precache_with_tracing = True
        ask, n_pre = asker("alpha")
        hinted = ask.run_batch(batch, backend=runtime, temperature=0)
        sgl.global_config.enable_precache_with_tracing = False
        plain = ask.run_batch(batch, backend=runtime, temperature=0)
        cold, _ = asker("beta")
        unhinted = cold.run_batch(batch, backend=runtime, temperature=0)
    finally:
        sgl.global_config.enable_precache_with_tracing = saved
    cached = [s.get_meta_info("a")["cached_tokens"] for s in hinted]
    # every program found the preamble cached (a token or two at its end may merge with
    # the question's first token)
    assert sum(cached) >= 8 * (n_pre - 2), (cached, n_pre)
    assert [s["a"] for s in hinted] == [s["a"] for s in plain]
    cold_cached = [s.get_meta_info("a")["cached_tokens"] for s in unhinted]
    assert sum(cold_cached) < sum(cached), (cold_cached, cached)


# ---------------------------------------------------------------------- server side
def test_concate_and_append_route():
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from asgl.server import lang_routes

    async def main():
        app = web.Application()
        lang_routes.add_routes(app)
        async with TestClient(TestServer(app)) as client:  # a free port, never a fixed one
            ok = await client.post("/concate_and_append_request",
                                   json={"src_rids": ["a", "b"], "dst_rid": "c"})
            bad = await client.post("/concate_and_append_request", json={"src_rids": "a"})
            return ok.status, await ok.json(), bad.status, await bad.json()

    status, body, bad_status, bad_body = asyncio.run(main())
    assert status == 200 and body["success"] is True
    assert bad_status == 400 and bad_body["error"]["param"] == "src_rids"


def test_sglang_client_against_asgl_serve(request):
    """SGLang's own frontend, pointed at `asgl serve`, runs the same programs."""
    sglang = pytest.importorskip(
        "sglang", reason="sglang's frontend is not installed here (`pip install sglang` "
                         "pulls its server's dependencies: zmq, starlette, ...)")
    main_server = request.getfixturevalue("main_server")  # only once sglang is there
    backend = sglang.RuntimeEndpoint(main_server.url)

    @sglang.function
    def decode_int_sgl(s):
        s += "The number of hours in a day is " + sglang.gen_int("hours") + "\n"

    @sglang.function
    def parallel_encoding_sgl(s, contexts):
        s += "USER: Please memorize these statements.\n"
        forks = s.fork(len(contexts))
        forks += lambda i: f"Statement {i}: " + contexts[i] + "\n"
        forks.join(mode="concate_and_append")
        s += "ASSISTANT:" + sglang.gen("answer", max_tokens=4)

    state = decode_int_sgl.run(backend=backend, temperature=0, max_new_tokens=6)
    assert re.fullmatch(r"[-+]?\d+", state["hours"].strip())
    state = parallel_encoding_sgl.run(contexts=list(CONTEXTS.values()), backend=backend,
                                      temperature=0)
    assert "Statement 2: Oliver" in state.text()


def test_flush_cache_server_info_and_bind(backend):
    @sgl.function
    def greet(s, who, punct):
        s += "Hello " + who + punct

    assert greet.bind(punct="!").run(who="you", backend=backend).text() == "Hello you!"
    assert sgl.flush_cache(backend) is True
    assert "memory_state" in sgl.get_server_info(backend)


def test_dtype_post_parse_rules():
    """Where the API takes no regex: the value is parsed out of the free answer."""
    from asgl.lang.backends.base import Backend, GenResult, Prompt, typed_generate

    class Answers(Backend):
        supports_regex = False

        def __init__(self, text):
            self.text = text

        async def generate(self, prompt, params):
            assert "regex" not in params  # never sent where the API takes none
            return GenResult(self.text, {})

    async def parse(text, dtype):
        return (await typed_generate(Answers(text), Prompt("", []), {}, dtype)).text

    cases = [(" about 24 hours", "int", "24"), ("pi is 3.14159.", "float", "3.14159"),
             (" true, it is", "bool", "True"), (' "Domain Name System"', "str",
                                                '"Domain Name System"'),
             ("Domain Name System\nmore", "str", '"Domain Name System"')]
    for text, dtype, want in cases:
        assert asyncio.run(parse(text, dtype)) == want, (text, dtype)
    with pytest.raises(BackendError, match="dtype=int"):
        asyncio.run(parse("no number here", "int"))
