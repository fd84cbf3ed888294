"""Tokenizer loading and chat templating.

`load_tokenizer` loads a fast (Rust) tokenizer from local files only. Chat requests are
rendered to text with the model's own Jinja template, or with `--chat-template`: a file path,
a Jinja string, or a built-in name (`chatml`, `llama-3`, `mistral`).

A rendered prompt already holds the template's special tokens (BOS included), so tokenize
it with `add_special_tokens=False`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any, Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from asgl.engine.loop.vlm_templates import VLM_CHAT_TEMPLATES

if TYPE_CHECKING:
    from asgl.models.loader import ModelSource

logger = logging.getLogger(__name__)

# Renders a message's content: a string, or OpenAI-style parts of which the text is kept.
_CONTENT = (
    "{%- macro content(m) -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- elif m['content'] -%}{%- for p in m['content'] if p['type'] == 'text' -%}"
    "{{ p['text'] }}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

# ChatML (Qwen, SmolLM, Hermes). Tools go in the system turn, Hermes-style: the model answers
# with <tool_call>{json}</tool_call>, which `--tool-call-parser hermes` reads back.
_CHATML = _CONTENT + (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' -%}{{ content(messages[0]) + '\\n\\n' }}{%- endif -%}"
    "{{ 'You can call these functions, given as JSON schemas in <tools></tools>:\\n<tools>\\n' }}"
    "{%- for tool in tools -%}{{ tool | tojson }}{{ '\\n' }}{%- endfor -%}"
    "{{ '</tools>\\nTo call one, answer with <tool_call>{\"name\": <name>, \"arguments\": "
    "<arguments as a JSON object>}</tool_call>.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if not (tools and loop.first and m['role'] == 'system') -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + content(m) }}"
    "{%- for call in m.get('tool_calls') or [] -%}"
    "{{ '<tool_call>{\"name\": ' + call['function']['name'] | tojson + ', \"arguments\": ' }}"
    # OpenAI sends arguments as a JSON string: insert it as is, not quoted again.
    "{%- if call['function']['arguments'] is string -%}{{ call['function']['arguments'] }}"
    "{%- else -%}{{ call['function']['arguments'] | tojson }}{%- endif -%}"
    "{{ '}</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Llama 3 / 3.1 header format.
_LLAMA_3 = _CONTENT + (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ content(m) | trim }}{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)

# Mistral [INST] format; a system message is put before the first user message.
_MISTRAL = _CONTENT + (
    "{%- set system = messages[0]['role'] == 'system' -%}"
    "{%- set turns = messages[1:] if system else messages -%}"
    "{{ bos_token }}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ '[INST] ' }}"
    "{%- if system and loop.first -%}{{ content(messages[0]) + '\\n\\n' }}{%- endif -%}"
    "{{ content(m) + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ content(m) + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

BUILTIN_CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML, "llama-3": _LLAMA_3, "mistral": _MISTRAL,
    **VLM_CHAT_TEMPLATES}  # chatml-llava, llava_llama_3, vicuna_v1.1, qwen2-vl


def load_tokenizer(source_or_dir: "ModelSource | str",
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the fast tokenizer of a `ModelSource` (or a directory), from local files only.
    A source's chat template is attached when the tokenizer files carry none."""
    if isinstance(source_or_dir, str):
        path, template = source_or_dir, None
    else:
        path, template = source_or_dir.tokenizer_dir, source_or_dir.chat_template
        if path is None:
            raise ValueError(f"model {source_or_dir.model_path!r} has no tokenizer: "
                             "give --tokenizer-path, or --skip-tokenizer-init to use token ids")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as exc:
        if trust_remote_code or "custom code" not in str(exc):
            raise
        tokenizer = _custom_code_tokenizer(path)
    if not tokenizer.is_fast:
        # The slow (Python) tokenizers hold the GIL; they work, but tokenizing on the event
        # loop gets slow.
        logger.warning("tokenizer in %s is not a fast tokenizer", path)
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    return tokenizer


def _custom_code_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A tokenizer whose class ships as code in the model directory (ChatGLM, InternLM 2,
    Qwen 1, BaiChuan, ...): that code never runs without --trust-remote-code; its
    tokenizer.json, where the directory has one, is read by the fast tokenizer instead."""
    from transformers import PreTrainedTokenizerFast

    tokenizer_json = os.path.join(path, "tokenizer.json")
    config_path = os.path.join(path, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    cls = config.get("tokenizer_class", "?")
    if not os.path.isfile(tokenizer_json):
        raise ValueError(
            f"the tokenizer in {path} ({cls}) is custom code, which asgl does not run unless "
            "--trust-remote-code is given; or give --tokenizer-path (a directory with an HF "
            "tokenizer.json), or --skip-tokenizer-init to serve token ids")
    logger.warning("tokenizer class %s in %s is custom code (not run): using its "
                   "tokenizer.json", cls, path)
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
               if k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return PreTrainedTokenizerFast(tokenizer_file=tokenizer_json,
                                   **{k: v for k, v in special.items() if isinstance(v, str)})


def resolve_chat_template(cfg_value: str | None, source: "ModelSource | None") -> str | None:
    """The chat template to use: `--chat-template` (built-in name, file, or Jinja text) when
    given, else the model's own; None when there is neither."""
    if cfg_value is not None:
        return _template_text(cfg_value)
    return source.chat_template if source is not None else None


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]],
                        chat_template: str | None = None, add_generation_prompt: bool = True,
                        tools: list[dict[str, Any]] | None = None,
                        continue_final_message: bool = False, **template_kwargs: Any) -> str:
    """Render `messages` to prompt text with `chat_template` (name, file or Jinja text) or, if
    None, the tokenizer's template. Raises ValueError when there is no template.
    `continue_final_message`: end inside the last (assistant) message, without its end of
    turn; `template_kwargs` become template variables (enable_thinking, reasoning_effort)."""
    template = _template_text(chat_template) if chat_template is not None \
        else tokenizer.chat_template
    if not template:
        raise ValueError("this model has no chat template: pass --chat-template with a Jinja "
                         f"file or one of {', '.join(BUILTIN_CHAT_TEMPLATES)}")
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tools=tools,
        add_generation_prompt=add_generation_prompt, tokenize=False,
        **({"continue_final_message": True} if continue_final_message else {}),
        **template_kwargs)


def _template_text(value: str) -> str:
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:  # already a Jinja template
        return value
    raise ValueError(f"chat template {value!r} is neither a file nor a built-in template "
                     f"({', '.join(BUILTIN_CHAT_TEMPLATES)})")
