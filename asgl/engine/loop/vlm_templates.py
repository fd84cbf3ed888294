"""Named chat templates of vision-language checkpoints, as SGLang users pass them
(`--chat-template chatml-llava | llava_llama_3 | vicuna_v1.1 | qwen2-vl`).

Jinja renderings of the conversation formats these names stand for (FastChat's
conversation templates, as SGLang's `srt/conversation.py` registers them): the default
system message each one carries, replaced by a request's own system message, then the
turns, then the open assistant turn. An image part of a message is already the model's
placeholder in the text (server/prompts.py), so the templates see text only. Templates
whose tokenizer adds a BOS when SGLang tokenizes the prompt (Llama / Vicuna) start with
`bos_token`, since asgl tokenizes rendered prompts without adding special tokens.
"""

from __future__ import annotations

_CONTENT = (
    "{%- macro content(m) -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- elif m['content'] -%}{%- for p in m['content'] if p['type'] == 'text' -%}"
    "{{ p['text'] }}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def _system(default: str) -> str:
    """Sets `sys`: the request's first system message, else the template's default."""
    return (
        "{%- set sys = " + repr(default) + " -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set sys = content(messages[0]) -%}{%- endif -%}"
    )


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's "
                  "questions.")
_LLAVA_LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to "
                        "understand the visual content that the user provides, and assist the "
                        "user with a variety of tasks using natural language.")

# "SYSTEM USER: q ASSISTANT: a</s>USER: q ASSISTANT:" (sep " ", sep2 "</s>")
VICUNA_V1_1 = _CONTENT + _system(_VICUNA_SYSTEM) + (
    "{{ bos_token }}{{ sys + ' ' }}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + content(m) + '</s>' }}"
    "{%- else -%}{{ 'USER: ' + content(m) + ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Llama 3 headers; each message stripped; the system turn only when non-empty.
LLAVA_LLAMA_3 = _CONTENT + _system(_LLAVA_LLAMA3_SYSTEM) + (
    "{{ bos_token }}"
    "{%- if sys -%}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + sys + '<|eot_id|>' }}"
    "{%- endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ content(m) | trim }}{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)


def _chatml(default: str) -> str:
    return _CONTENT + _system(default) + (
        "{%- if sys -%}{{ '<|im_start|>system\\n' + sys + '<|im_end|>\\n' }}{%- endif -%}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + content(m) + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


VLM_CHAT_TEMPLATES: dict[str, str] = {
    "vicuna_v1.1": VICUNA_V1_1,
    "llava_llama_3": LLAVA_LLAMA_3,
    "chatml-llava": _chatml("You are a helpful assistant."),
    "qwen2-vl": _chatml("You are a helpful assistant."),
}
