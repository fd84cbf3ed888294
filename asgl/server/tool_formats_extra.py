"""The `--tool-call-parser` formats beside hermes and llama3 (tool_calls.py lists them):
what the model writes (for tool_calls.py's `with_tool_prompt` when a template does not
render tools itself, and for constrained `tool_choice`), and the parser that reads it
(tool_parsers_extra.py).

Each has ToolFormat's interface (tool_calls.py), duck-typed so that this module need not
import tool_calls (which imports it). `tool_choice` "required" / a named function is
enforced with a grammar where calls carry their arguments as one JSON object (mistral,
deepseekv3, deepseekv31, kimi_k2); the formats whose arguments are XML or Python
(qwen3_coder, glm45, pythonic) and gpt-oss's harmony are refused with a 400 there.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from asgl.server.errors import bad_request
from asgl.server.tool_parsers import ToolCallParser
from asgl.server import tool_parsers_extra as p
from asgl.server.tool_parsers_harmony import HarmonyToolParser
from asgl.server.tool_parsers_pythonic import PythonicParser

_MAX_WS = 2  # as tool_calls.py: whitespace runs inside constrained arguments


def _listed(tools: list) -> str:
    return "\n".join(json.dumps({"type": "function", "function": {
        "name": t.name, "description": t.description, "parameters": t.parameters}},
        ensure_ascii=False) for t in tools)


class ExtraFormat:
    name = ""
    args_key = "arguments"
    separator = "\n"
    needs_special_tokens = False  # the format's markers are special tokens: keep them
    parser_class: type = p.SectionCallParser
    example = ""  # how one call looks, for the instructions

    def call_prefix(self, name: str) -> str:
        raise bad_request(f"tool_choice 'required' or a named function is not supported with "
                          f"--tool-call-parser {self.name} yet (use 'auto')", "tool_choice")

    def call_suffix(self) -> str:
        return ""

    def render_call(self, name: str, arguments: str) -> str:
        return self.example.replace("NAME", name).replace("ARGS", arguments)

    def instructions(self, tools: list) -> str:
        return ("You can call the functions listed below (JSON schemas). To call one, write "
                f"exactly:\n{self.render_call('<name>', '<arguments object>')}\n\n"
                + _listed(tools))

    def structural_tag(self, setup: Any) -> str:
        tags = [{"type": "tag", "begin": self.call_prefix(t.name),
                 "content": {"type": "json_schema", "json_schema": t.parameters,
                             "max_whitespace_cnt": _MAX_WS},
                 "end": self.call_suffix()} for t in setup.shown]
        single = setup.mode == "named" or not setup.parallel
        return json.dumps({"type": "structural_tag", "format": {
            "type": "tags_with_separator", "tags": tags, "separator": self.separator,
            "at_least_one": True, "stop_after_first": single}})

    def parser(self, tools: Optional[list] = None) -> ToolCallParser:
        schemas = {t.name: t.parameters for t in tools or []}
        return self.parser_class(schemas)


class MistralFormat(ExtraFormat):
    name = "mistral"
    needs_special_tokens = True  # [TOOL_CALLS] is a control token
    parser_class = p.MistralParser
    example = '[TOOL_CALLS][{"name": "NAME", "arguments": ARGS}]'

    def call_prefix(self, name: str) -> str:
        return '[TOOL_CALLS][{"name": ' + json.dumps(name) + ', "arguments": '

    def call_suffix(self) -> str:
        return "}]"


class Qwen3CoderFormat(ExtraFormat):
    name = "qwen3_coder"
    parser_class = p.Qwen3CoderParser
    example = ("<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n"
               "</function>\n</tool_call>")

    def render_call(self, name: str, arguments: str) -> str:
        try:
            args = json.loads(arguments)
        except ValueError:
            args = {}
        params = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n"
                         f"</parameter>\n" for k, v in (args or {}).items())
        return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


class DeepSeekV3Format(ExtraFormat):
    name = "deepseekv3"
    parser_class = p.DeepSeekV3Parser
    example = (p._DS_CALLS_BEGIN + p._DS_CALL_BEGIN + "function" + p._DS_SEP + "NAME\n```json\n"
               "ARGS\n```" + p._DS_CALL_END + p._DS_CALLS_END)

    def call_prefix(self, name: str) -> str:
        return (p._DS_CALLS_BEGIN + p._DS_CALL_BEGIN + "function" + p._DS_SEP + name
                + "\n```json\n")

    def call_suffix(self) -> str:
        return "\n```" + p._DS_CALL_END + p._DS_CALLS_END


class DeepSeekV31Format(ExtraFormat):
    name = "deepseekv31"
    parser_class = p.DeepSeekV31Parser
    example = (p._DS_CALLS_BEGIN + p._DS_CALL_BEGIN + "NAME" + p._DS_SEP + "ARGS"
               + p._DS_CALL_END + p._DS_CALLS_END)

    def call_prefix(self, name: str) -> str:
        return p._DS_CALLS_BEGIN + p._DS_CALL_BEGIN + name + p._DS_SEP

    def call_suffix(self) -> str:
        return p._DS_CALL_END + p._DS_CALLS_END


class KimiK2Format(ExtraFormat):
    name = "kimi_k2"
    parser_class = p.KimiK2Parser
    example = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0"
               "<|tool_call_argument_begin|>ARGS<|tool_call_end|><|tool_calls_section_end|>")

    def call_prefix(self, name: str) -> str:
        return ("<|tool_calls_section_begin|><|tool_call_begin|>functions." + name + ":0"
                "<|tool_call_argument_begin|>")

    def call_suffix(self) -> str:
        return "<|tool_call_end|><|tool_calls_section_end|>"


class Glm45Format(ExtraFormat):
    name = "glm45"
    parser_class = p.Glm45Parser
    example = "<tool_call>NAME\n<arg_key>KEY</arg_key>\n<arg_value>VALUE</arg_value>\n</tool_call>"

    def render_call(self, name: str, arguments: str) -> str:
        try:
            args = json.loads(arguments)
        except ValueError:
            args = {}
        pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>"
                        f"{v if isinstance(v, str) else json.dumps(v)}</arg_value>\n"
                        for k, v in (args or {}).items())
        return f"<tool_call>{name}\n{pairs}</tool_call>"


class PythonicFormat(ExtraFormat):
    name = "pythonic"
    parser_class = PythonicParser
    example = "[NAME(key=value, ...)]"

    def render_call(self, name: str, arguments: str) -> str:
        try:
            args = json.loads(arguments)
        except ValueError:
            args = {}
        return f"[{name}({', '.join(f'{k}={v!r}' for k, v in (args or {}).items())})]"


class GptOssFormat(ExtraFormat):
    name = "gpt-oss"
    needs_special_tokens = True  # harmony's markers are special tokens
    parser_class = HarmonyToolParser
    example = "<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGS<|call|>"


EXTRA_FORMATS = {f.name: f for f in (MistralFormat(), Qwen3CoderFormat(), DeepSeekV3Format(),
                                     DeepSeekV31Format(), KimiK2Format(), Glm45Format(),
                                     PythonicFormat(), GptOssFormat())}
