"""Tokenizer loading and chat templates, on the embedded SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from asgl.config import EngineConfig
from asgl.engine.loop.tokenizer import (BUILTIN_CHAT_TEMPLATES, apply_chat_template, load_tokenizer,
                                   resolve_chat_template)
from asgl.models.loader import resolve_model

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]


@pytest.fixture(scope="module")
def source(smol_conversion):
    """The embedded model resolved in a fresh conversion cache (not the user's): the
    session's, where conftest.py converted it once for this module and test_loader.py."""
    root = smol_conversion[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASGL_CACHE_DIR", str(root))
        yield resolve_model(EngineConfig())


@pytest.fixture(scope="module")
def tokenizer(source):
    return load_tokenizer(source)


def test_round_trip(tokenizer):
    text = "Hello, world! Ünïcödé and   spaces\n\ttabs 12345 <|im_start|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.is_fast and len(tokenizer) == 49152
    assert tokenizer.decode(ids) == text
    # a special token in the text stays one id
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|im_start|>"


def test_gguf_chat_template(tokenizer, source):
    assert tokenizer.chat_template == source.chat_template
    text = apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")  # SmolLM's template adds a default system turn
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}],
                                    add_generation_prompt=False)
    assert no_prompt.endswith("<|im_end|>\n")


def test_load_tokenizer_from_directory(source):
    assert load_tokenizer(source.tokenizer_dir).encode("a b", add_special_tokens=False)


def test_builtin_chatml(tokenizer):
    assert apply_chat_template(tokenizer, CHAT, "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_builtin_chatml_tools(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    calls = [{"type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]
    chat = CHAT[:2] + [{"role": "assistant", "content": "", "tool_calls": calls},
                       {"role": "tool", "content": "12:00"}]
    text = apply_chat_template(tokenizer, chat, "chatml", tools=tools)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n")
    assert '"name": "get_time"' in text and text.count("<|im_start|>system") == 1
    assert '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>' in text
    assert "<|im_start|>tool\n12:00<|im_end|>\n" in text


def test_builtin_llama3(tokenizer):
    text = apply_chat_template(tokenizer, CHAT, "llama-3")
    bos = tokenizer.bos_token  # the template's BOS is the tokenizer's, whatever it is
    assert text == (bos + "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_builtin_mistral(tokenizer):
    text = apply_chat_template(tokenizer, CHAT, "mistral")
    assert text == (tokenizer.bos_token + "[INST] Be brief.\n\nHi [/INST]Hello!"
                    + tokenizer.eos_token + "[INST] Bye [/INST]")


def test_template_from_file_and_resolve(tokenizer, source, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    assert apply_chat_template(tokenizer, CHAT[1:3], str(path)) == "<user>Hi<assistant>Hello!"
    assert resolve_chat_template(str(path), source) == path.read_text()
    assert resolve_chat_template("chatml", source) == BUILTIN_CHAT_TEMPLATES["chatml"]
    assert resolve_chat_template(None, source) == source.chat_template


def test_missing_template(tokenizer, source):
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(ValueError, match="no chat template.*chatml"):
            apply_chat_template(tokenizer, CHAT)
    finally:
        tokenizer.chat_template = saved
    with pytest.raises(ValueError, match="'no-such-template' is neither a file nor a built-in"):
        resolve_chat_template("no-such-template", source)
