"""The interpreter of asgl.lang on fake backends (no model): expression building, operation
order, roles rendered with real chat templates, fork, errors, both program forms, run from
inside a running event loop, run_batch concurrency, streaming, images, select's fallback."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import pytest

import asgl
from asgl.lang import (ProgramError, assistant, assistant_begin, assistant_end,
                       function, gen, image, select, system, user)
from asgl.lang.backends.base import (Backend, BackendError, GenResult, Prompt, StreamEvent,
                                     closest_choice, constrained_select)
from asgl.lang.chat import JinjaChatTemplate, PlainChatTemplate

pytestmark = pytest.mark.timeout(60)

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")


class FakeBackend(Backend):
    """gen answers "<n>" (the call number); records prompts/params and concurrency."""

    def __init__(self, delay: float = 0.0, template=None, fail_on: str = ""):
        self.delay = delay
        self.template = template or PlainChatTemplate()
        self.fail_on = fail_on
        self.prompts: list[Prompt] = []
        self.params: list[dict] = []
        self.cached: list[str] = []
        self.active = self.max_active = 0

    async def chat_template(self):
        return self.template

    async def generate(self, prompt: Prompt, params: dict) -> GenResult:
        self.prompts.append(prompt)
        self.params.append(params)
        if self.fail_on and prompt.text.endswith(self.fail_on):
            raise BackendError("the fake backend refuses this", status=400)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        return GenResult(f"<{len(self.prompts)}>", {"prompt_tokens": len(prompt.text)})

    async def stream(self, prompt: Prompt, params: dict) -> AsyncIterator[StreamEvent]:
        result = await self.generate(prompt, params)
        for ch in result.text:
            yield StreamEvent(ch)
            await asyncio.sleep(0)
        yield StreamEvent("", result.meta)

    async def cache_prefix(self, prompt: Prompt):
        self.cached.append(prompt.text)
        return {}


@pytest.fixture(scope="module")
def smol_tokenizer():
    from asgl.config import EngineConfig
    from asgl.engine.loop.tokenizer import load_tokenizer
    from asgl.models.loader import resolve_model
    return load_tokenizer(resolve_model(EngineConfig()))


# ---------------------------------------------------------------------- programs, order


def test_concatenation_gen_and_variables():
    backend = FakeBackend()

    @function
    def prog(s, name):
        s += "Hi " + name + ". " + gen("a", max_tokens=4) + " and " + gen("b")
        s += "!"
        return s["a"]

    state = prog.run("Ann", backend=backend, temperature=0)
    assert state.text() == "Hi Ann. <1> and <2>!"
    assert state["a"] == "<1>" and state["b"] == "<2>" and state.ret_value == "<1>"
    # each gen saw exactly the text before it; run-wide defaults fill what gen leaves out
    assert [p.text for p in backend.prompts] == ["Hi Ann. ", "Hi Ann. <1> and "]
    assert backend.params[0] == {"max_new_tokens": 4, "temperature": 0}
    assert backend.params[1] == {"max_new_tokens": 128, "temperature": 0}
    assert state.get_meta_info("a") == {"prompt_tokens": 8}


def test_async_program_awaits_gen():
    backend = FakeBackend()

    @function
    async def prog(s):
        s += "Q: "
        first = await s.gen("x", max_tokens=2)
        s += " then "
        return first + await s.gen("y")

    state = prog.run(backend=backend)
    assert state.ret_value == "<1><2>" and state.text() == "Q: <1> then <2>"


def test_state_gen_queues_at_once_in_either_form():
    @function
    def prog(s):
        s += "a"
        s.gen("x")  # queued even though nothing awaits it
        s += "b"
        return s.gen("y").result()

    state = prog.run(backend=FakeBackend())
    assert state.text() == "a<1>b<2>" and state.ret_value == "<2>"


async def test_async_read_before_ready_says_to_await():
    @function
    async def prog(s):
        s += gen("x")
        with pytest.raises(RuntimeError, match="await s.gen"):
            s["x"]
        await s.wait()
        return s["x"]

    state = await prog.arun(backend=FakeBackend(delay=0.05))
    assert state.ret_value == "<1>"


def test_bad_calls_fail_early():
    @function
    def prog(s, question):
        s += question

    with pytest.raises(TypeError):
        prog.run(backend=FakeBackend())  # missing argument
    with pytest.raises(TypeError, match="cannot add a int"):
        prog.run(3, backend=FakeBackend())
    with pytest.raises(TypeError, match="unknown sampling"):
        gen("x", max_tokens=3).params.update(asgl.lang.sampling.clean({"bogus": 1}))
    with pytest.raises(ValueError):
        select("x", choices=[])
    assert isinstance(gen("t", choices=["a", "b"]), asgl.lang.ir.Select)


def test_run_works_inside_a_running_event_loop():
    @function
    def prog(s):
        s += "x" + gen("y")

    async def notebook_cell():
        return prog.run(backend=FakeBackend())["y"]

    assert asyncio.run(notebook_cell()) == "<1>"


def test_errors_surface():
    backend = FakeBackend(fail_on="boom")

    @function
    def prog(s):
        s += "boom" + gen("x") + "after"

    with pytest.raises(BackendError, match="refuses"):
        prog.run(backend=backend)
    states = prog.run_batch([{}, {}], backend=backend)
    assert all(isinstance(st.error(), BackendError) for st in states)
    with pytest.raises(BackendError):
        states[0]["x"]


# ---------------------------------------------------------------------- roles


def test_roles_render_exactly_like_the_template(smol_tokenizer):
    """SmolLM2's own template (which adds a system prompt before a first user turn), the
    Llama 3 one (BOS, headers) and Mistral's (system folded into the first [INST])."""
    from asgl.engine.loop.tokenizer import apply_chat_template

    @function
    def chat(s, with_system):
        if with_system:
            s += system("Be brief.")
        s += user("Hello?")
        s += assistant(gen("a"))
        with s.user():
            s += "And " + "then?"
        s += assistant_begin()
        s += gen("b")
        s += assistant_end()

    for name in (None, "llama-3", "mistral"):
        for with_system in (True, False):
            template = JinjaChatTemplate.from_tokenizer(smol_tokenizer, name)
            state = chat.run(with_system, backend=FakeBackend(template=template))
            messages = state.messages()
            assert [m["role"] for m in messages] == (["system"] if with_system else []) + [
                "user", "assistant", "user", "assistant"]
            assert messages[-1]["content"] == "<2>"
            expected = apply_chat_template(smol_tokenizer, messages, name,
                                           add_generation_prompt=False)
            assert state.text() == expected, (name, with_system)


def test_role_misuse_is_an_error():
    @function
    def nested(s):
        s += assistant_begin() + user("x")

    @function
    def unopened(s):
        s += assistant_end()

    with pytest.raises(ProgramError, match="open"):
        nested.run(backend=FakeBackend())
    with pytest.raises(ProgramError, match="without an open"):
        unopened.run(backend=FakeBackend())


# ---------------------------------------------------------------------- fork, batch


def test_fork_branches_share_the_prefix_and_run_concurrently():
    backend = FakeBackend(delay=0.2)

    @function
    def prog(s):
        s += "Shared. "
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f"B{i}:" + gen("x")
        s += "|".join(f["x"] for f in forks)
        return forks

    start = time.monotonic()
    state = prog.run(backend=backend)
    assert time.monotonic() - start < 0.5  # three 0.2 s gens at once, not in a row
    assert backend.max_active == 3 and backend.cached == ["Shared. "]
    assert sorted(f.text() for f in state.ret_value) == sorted(
        f"Shared. B{i}:{f['x']}" for i, f in enumerate(state.ret_value))
    assert state.text().startswith("Shared. <")


def test_run_batch_runs_concurrently_and_bounded():
    @function
    def prog(s, i):
        s += f"{i}:" + gen("x")

    backend = FakeBackend(delay=0.1)
    start = time.monotonic()
    states = prog.run_batch([{"i": i} for i in range(16)], backend=backend)
    assert time.monotonic() - start < 0.8 and backend.max_active == 16
    assert [st.text().split(":")[0] for st in states] == [str(i) for i in range(16)]

    backend = FakeBackend(delay=0.05)
    prog.run_batch([{"i": i} for i in range(12)], backend=backend, max_concurrency=4)
    assert backend.max_active == 4


async def test_arun_batch_async_programs():
    @function
    async def prog(s, i):
        s += f"{i}:"
        return await s.gen("x")

    backend = FakeBackend(delay=0.1)
    states = await prog.arun_batch([{"i": i} for i in range(8)], backend=backend)
    assert backend.max_active == 8 and all(st.ret_value.startswith("<") for st in states)


# ---------------------------------------------------------------------- streaming


def test_text_iter_follows_the_program():
    @function
    def prog(s):
        s += "A:" + gen("x") + ";B:" + gen("y")

    state = prog.run(backend=FakeBackend(delay=0.01), stream=True)
    pieces = list(state.text_iter())
    assert len(pieces) > 4 and "".join(pieces) == state.text() == "A:<1>;B:<2>"
    state = prog.run(backend=FakeBackend(), stream=True)
    assert "".join(state.text_iter("y")) == "<2>"


async def test_async_for_follows_the_program():
    @function
    async def prog(s):
        s += "A:"
        await s.gen("x")

    state = await prog.arun(backend=FakeBackend(delay=0.01), stream=True)
    pieces = [p async for p in state]
    assert "".join(pieces) == "A:<1>"


# ---------------------------------------------------------------------- images, select


def test_image_is_recorded_in_the_messages(tmp_path):
    path = tmp_path / "pixel.png"
    path.write_bytes(PNG)

    @function
    def prog(s, img):
        s += user(image(img) + "What is this?")

    for source in (str(path), PNG):
        state = prog.run(source, backend=FakeBackend())
        content = state.messages()[0]["content"]
        assert content[0]["type"] == "image_url"
        assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert content[1] == {"type": "text", "text": "What is this?"}
        assert len(state.images()) == 1
    with pytest.raises(FileNotFoundError):
        image(str(tmp_path / "missing.png"))


def test_closest_choice():
    choices = ["calculator", "search engine"]
    assert closest_choice(" Search engine.", choices) == "search engine"
    assert closest_choice("I'd use a calculator", choices) == "calculator"
    assert closest_choice("calculate", choices) == "calculator"
    assert closest_choice("category", ["cat", "category"]) == "category"


async def test_select_fallback_without_scores_learns_that_regex_is_refused():
    class NoRegex(FakeBackend):
        async def generate(self, prompt, params):
            if "regex" in params:
                raise BackendError("constrained decoding (regex) is not supported yet",
                                   status=400, param="regex")
            await super().generate(prompt, params)
            return GenResult(" Search engine, because", {})

    backend = NoRegex()
    result = await constrained_select(backend, Prompt("I need a ", []),
                                      ["calculator", "search engine"], {})
    assert result.choice == "search engine" and result.meta["method"] == "closest_match"
    assert backend.supports_regex is False and backend.params[-1]["temperature"] == 0.0
