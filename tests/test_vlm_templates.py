"""The named chat templates of vision-language checkpoints render the prompts their
published definitions give (FastChat's conversation formats as SGLang registers them in
`python/sglang/srt/conversation.py`): the expected strings below are written out by hand
from those definitions (system template, role names, separators)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from asgl.engine.loop.tokenizer import apply_chat_template  # noqa: E402
from vlm_fixtures import tiny_tokenizer  # noqa: E402

VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The "
              "assistant gives helpful, detailed, and polite answers to the user's questions.")
L3_SYS = ("You are a helpful language and vision assistant. You are able to understand the "
          "visual content that the user provides, and assist the user with a variety of tasks "
          "using natural language.")
Q = "<image>\nWhat is shown?"
TURNS = [{"role": "user", "content": Q}, {"role": "assistant", "content": " A cat. "},
         {"role": "user", "content": "And its color?"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()  # bos_token "<s>"


CASES = {
    # ADD_COLON_TWO, sep " ", sep2 "</s>"; the tokenizer's BOS first (Llama adds it)
    "vicuna_v1.1": (
        f"<s>{VICUNA_SYS} USER: {Q} ASSISTANT:",
        f"<s>{VICUNA_SYS} USER: {Q} ASSISTANT:  A cat. </s>USER: And its color? ASSISTANT:",
        "<s>Be brief. USER: hi ASSISTANT:"),
    # LLAMA3 style: system turn, headers, stripped messages, <|eot_id|>
    "llava_llama_3": (
        f"<s><|start_header_id|>system<|end_header_id|>\n\n{L3_SYS}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        f"<s><|start_header_id|>system<|end_header_id|>\n\n{L3_SYS}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd its color?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    # CHATML, sep "<|im_end|>" then a newline
    "chatml-llava": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n A cat. <|im_end|>\n"
        "<|im_start|>user\nAnd its color?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"),
    # ADD_NEW_LINE_SINGLE, sep "<|im_end|>\n"
    "qwen2-vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n A cat. <|im_end|>\n"
        "<|im_start|>user\nAnd its color?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_named_template_renders_the_published_format(tok, name):
    one, multi, with_system = CASES[name]
    assert apply_chat_template(tok, [TURNS[0]], chat_template=name) == one
    assert apply_chat_template(tok, TURNS, chat_template=name) == multi
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert apply_chat_template(tok, messages, chat_template=name) == with_system
