"""The SGLang README's `image_qa` program (examples/image_qa.py) on a vision model, with
the in-process `Runtime` and with `RuntimeEndpoint` against `asgl serve`: the image travels
with the program's state (its placeholder in the text, its bytes as image_data), and the
answer is transformers' greedy answer to the prompt the vicuna_v1.1 template gives."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("PIL")

import asgl as sgl  # noqa: E402
from server_fixture import ServerProcess, free_port  # noqa: E402
from vlm_fixtures import agree, hf_greedy, hf_llava, image_bytes, save_tiny_llava  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
import image_qa  # noqa: E402

pytestmark = pytest.mark.timeout(300)
MAX_NEW = 6
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the user's questions.")
ARGS = dict(dtype="float32", device="cpu", chat_template="vicuna_v1.1", max_total_tokens=2048)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    return save_tiny_llava(str(tmp_path_factory.mktemp("llava_lang")), seed=3)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "picture.png"
    path.write_bytes(image_bytes(7, size=(50, 40)))
    return str(path)


@pytest.fixture(scope="module")
def reference(llava_dir, image_file):
    with open(image_file, "rb") as f:
        data = f.read()
    hf = hf_llava(llava_dir)
    prompt = f"<s>{SYSTEM} USER: <image>\nWhat is in this image? ASSISTANT:"
    ref, gaps, _, _ = hf_greedy(hf, prompt, [data], MAX_NEW)
    return ref, gaps, hf[2]


@pytest.fixture(scope="module")
def backends(llava_dir):
    runtime = sgl.Runtime(model_path=llava_dir, **ARGS)
    server = ServerProcess(["--model-path", llava_dir, "--dtype", "float32", "--device", "cpu",
                            "--chat-template", "vicuna_v1.1"], free_port())
    try:
        server.wait_ready()
        yield {"runtime": runtime, "endpoint": sgl.RuntimeEndpoint(server.url)}
    finally:
        runtime.shutdown()
        server.stop()


@pytest.mark.parametrize("which", ["runtime", "endpoint"])
def test_readme_image_qa_on_a_vision_model(backends, reference, image_file, which,
                                           monkeypatch):
    monkeypatch.setattr(image_qa, "MAX_TOKENS", MAX_NEW)
    ref, gaps, tok = reference
    for program in (image_qa.image_qa, image_qa.image_qa_async):
        state = program.run(image_file=image_file, question="What is in this image?",
                            backend=backends[which], temperature=0)
        agree(state["answer"], ref, gaps, tok)
        assert len(state.images()) == 1

    @sgl.function
    def forked(s, image_file):  # branches share the image and the prefix's KV
        s += sgl.user(sgl.image(image_file) + "What is in this image?")
        forks = s.fork(2)
        for f in forks:
            f += sgl.assistant(sgl.gen("answer", max_tokens=MAX_NEW, temperature=0))
        s["answers"] = [f["answer"] for f in forks]

    state = forked.run(image_file=image_file, backend=backends[which])
    for answer in state["answers"]:
        agree(answer, ref, gaps, tok)
