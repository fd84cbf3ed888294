"""Tool (function) calling for /v1/chat/completions.

- `ToolSetup.from_request` validates `tools`, `tool_choice` and `parallel_tool_calls`.
- `tool_choice` "required" or a named function is enforced with a grammar (an xgrammar
  structural tag): the output is one or more calls in the `--tool-call-parser` format,
  each call's arguments constrained by that tool's parameter schema, so even a 135M model
  produces valid calls. "auto" leaves the output free and parses whatever calls it holds;
  "none" shows no tools and parses nothing.
- Each format has an incremental parser (tool_parsers.py) that reads one choice's output
  into content and call deltas; streamed and non-streamed responses use the same one.

Formats (`--tool-call-parser`):
  hermes (Qwen, Hermes, ChatML):  <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>
  llama3 (Llama 3.1 JSON):        {"name": "f", "parameters": {...}}  (calls joined by "; ")
  mistral, qwen3_coder, deepseekv3, deepseekv31, kimi_k2, glm45, pythonic, gpt-oss:
                                  tool_formats_extra.py
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

import msgspec

from asgl.config import EngineConfig
from asgl.engine.grammar.specs import normalize_json_schema
from asgl.engine.contracts.errors import InvalidRequest
from asgl.server.errors import bad_request
from asgl.server.tool_formats_extra import EXTRA_FORMATS
from asgl.server.tool_parsers import (CallDelta, JsonCallParser, TaggedCallParser,
                                      ToolCallParser)

__all__ = ["CallDelta", "ToolCallParser", "ToolFormat", "ToolSetup", "get_format",
           "with_tool_prompt"]

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# Whitespace runs allowed inside constrained arguments (keeps small models from looping).
_MAX_WS = 2
_DEFAULT_LIMITS = EngineConfig()  # the limits of a call without a server's config


# --------------------------------------------------------------------------- request side


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict


@dataclass
class ToolSetup:
    tools: list[Tool]
    mode: str  # "none" | "auto" | "required" | "named"
    named: Optional[str] = None
    parallel: bool = True

    @classmethod
    def from_request(cls, tools: Optional[list], tool_choice: Any, parallel: Optional[bool],
                     config: Optional[EngineConfig] = None) -> Optional["ToolSetup"]:
        """None when the request has no tools (tool_choice alone is a 400, as OpenAI).
        `config` gives the limits (--max-tools, --max-schema-depth, --max-schema-bytes)."""
        if not tools:
            if tool_choice not in (None, "none"):
                raise bad_request("tool_choice needs tools", "tool_choice")
            return None
        cfg = config or _DEFAULT_LIMITS
        if len(tools) > cfg.max_tools:
            raise bad_request(f"{len(tools)} tools; the limit is {cfg.max_tools} (--max-tools)",
                              "tools")
        # every tool is shown in the prompt and their schemas join one grammar: bounded
        # together, measured by msgspec's C encoder before any Python walks them
        size = len(msgspec.json.encode(tools))
        if size > cfg.max_schema_bytes:
            raise bad_request(f"the tools have {size} bytes (as JSON) in all; the limit is "
                              f"{cfg.max_schema_bytes} (--max-schema-bytes)", "tools")
        parsed = [_parse_tool(t, i, cfg.max_schema_depth) for i, t in enumerate(tools)]
        names = [t.name for t in parsed]
        if len(set(names)) != len(names):
            raise bad_request("tool names must be unique", "tools")
        mode, named = _parse_choice(tool_choice, names)
        return cls(parsed, mode, named, parallel is not False)

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    @property
    def shown(self) -> list[Tool]:
        """The tools the prompt lists."""
        if self.mode == "none":
            return []
        return [t for t in self.tools if self.named in (None, t.name)]

    def openai_tools(self) -> list[dict]:
        """The shown tools as chat templates expect them (OpenAI's shape)."""
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}}
                for t in self.shown]


def _parse_tool(tool: Any, i: int, max_depth: int) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or \
            not isinstance(tool.get("function"), dict):
        raise bad_request(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}} "
                          f"(only function tools are supported)", where)
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_request(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or "
                          f"'-'", f"{where}.function.name")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise bad_request(f"{where}.function.parameters must be a JSON schema of an object",
                          f"{where}.function.parameters")
    params = {"type": "object", **params}  # arguments are always an object
    try:  # refused here, naming the tool, rather than when the grammar compiles
        normalize_json_schema(params, f"{where}.function.parameters", max_depth)
    except InvalidRequest as e:
        raise bad_request(f"{where} ({name}): {e}", e.param) from None
    description = fn.get("description")
    return Tool(name, description if isinstance(description, str) else "", params)


def _parse_choice(choice: Any, names: list[str]) -> tuple[str, Optional[str]]:
    if choice is None:
        return "auto", None
    if choice in ("none", "auto", "required"):
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function" and \
            isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise bad_request(f"tool_choice names the function {name!r}, which is not among "
                              f"the tools", "tool_choice")
        return "named", name
    raise bad_request("tool_choice must be 'none', 'auto', 'required' or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")


# --------------------------------------------------------------------------- formats


class ToolFormat:
    """How a model writes calls: what the grammar enforces and the parser reads."""
    name = ""
    args_key = "arguments"
    separator = "\n"

    def call_prefix(self, name: str) -> str:
        raise NotImplementedError

    def call_suffix(self) -> str:
        raise NotImplementedError

    def instructions(self, tools: list[Tool]) -> str:
        raise NotImplementedError

    def render_call(self, name: str, arguments: str) -> str:
        return self.call_prefix(name) + arguments + self.call_suffix()

    def structural_tag(self, setup: ToolSetup) -> str:
        """The grammar of `tool_choice` required / named: calls only, at least one."""
        tags = [{"type": "tag", "begin": self.call_prefix(t.name),
                 "content": {"type": "json_schema", "json_schema": t.parameters,
                             "max_whitespace_cnt": _MAX_WS},
                 "end": self.call_suffix()}
                for t in setup.shown]
        single = setup.mode == "named" or not setup.parallel
        return json.dumps({"type": "structural_tag", "format": {
            "type": "tags_with_separator", "tags": tags, "separator": self.separator,
            "at_least_one": True, "stop_after_first": single}})

    def parser(self, tools: Optional[list] = None) -> "ToolCallParser":
        raise NotImplementedError


class HermesFormat(ToolFormat):
    name = "hermes"

    def call_prefix(self, name: str) -> str:
        return '<tool_call>\n{"name": ' + json.dumps(name) + ', "arguments": '

    def call_suffix(self) -> str:
        return "}\n</tool_call>"

    def instructions(self, tools: list[Tool]) -> str:
        listed = "\n".join(json.dumps(_tool_json(t), ensure_ascii=False) for t in tools)
        return ("You can call functions to help with the request. Their JSON schemas are "
                f"listed in <tools></tools>:\n<tools>\n{listed}\n</tools>\n"
                "To call a function, answer with its name and arguments as a JSON object "
                "inside <tool_call></tool_call> tags:\n<tool_call>\n"
                '{"name": <function name>, "arguments": <arguments object>}\n</tool_call>')

    def parser(self, tools: Optional[list] = None) -> "ToolCallParser":
        return TaggedCallParser("<tool_call>", "</tool_call>")


class Llama3Format(ToolFormat):
    name = "llama3"
    args_key = "parameters"
    separator = "; "

    def call_prefix(self, name: str) -> str:
        return '{"name": ' + json.dumps(name) + ', "parameters": '

    def call_suffix(self) -> str:
        return "}"

    def instructions(self, tools: list[Tool]) -> str:
        listed = "\n\n".join(json.dumps(_tool_json(t), indent=2, ensure_ascii=False)
                             for t in tools)
        return ("You have access to the functions below. To call one, reply with only a JSON "
                'object {"name": function name, "parameters": object of argument names and '
                'values}; separate several calls with "; ".\n\n' + listed)

    def parser(self, tools: Optional[list] = None) -> "ToolCallParser":
        return JsonCallParser()


FORMATS: dict[str, ToolFormat] = {
    "hermes": HermesFormat(), "llama3": Llama3Format(),
    # tool_formats_extra.py (listed here by name: launch.py's preflight reads these keys)
    "mistral": EXTRA_FORMATS["mistral"], "qwen3_coder": EXTRA_FORMATS["qwen3_coder"],
    "deepseekv3": EXTRA_FORMATS["deepseekv3"], "deepseekv31": EXTRA_FORMATS["deepseekv31"],
    "kimi_k2": EXTRA_FORMATS["kimi_k2"], "glm45": EXTRA_FORMATS["glm45"],
    "pythonic": EXTRA_FORMATS["pythonic"], "gpt-oss": EXTRA_FORMATS["gpt-oss"]}
_ALIASES = {"qwen": "hermes", "qwen25": "hermes", "chatml": "hermes", "llama": "llama3",
            "llama31": "llama3", "llama3_json": "llama3", "llama4_pythonic": "pythonic",
            "qwen3-coder": "qwen3_coder", "deepseek_v3": "deepseekv3",
            "deepseek_v31": "deepseekv31", "openai": "gpt-oss", "gpt_oss": "gpt-oss",
            "kimi-k2": "kimi_k2", "glm4_moe": "glm45", "glm4.5": "glm45"}


def get_format(name: Optional[str]) -> ToolFormat:
    """The --tool-call-parser format (hermes when unset: the ChatML family's)."""
    key = _ALIASES.get(name or "hermes", name or "hermes")
    if key not in FORMATS:
        raise ValueError(f"unknown --tool-call-parser {name!r} (known: "
                         f"{', '.join(sorted(set(FORMATS) | set(_ALIASES)))})")
    return FORMATS[key]


def _tool_json(t: Tool) -> dict:
    return {"type": "function", "function": {"name": t.name, "description": t.description,
                                             "parameters": t.parameters}}


def with_tool_prompt(messages: list[dict], setup: Optional[ToolSetup], fmt: ToolFormat,
                     template: str) -> tuple[list[dict], Optional[list[dict]]]:
    """(messages, tools for the chat template). A template that knows tools renders them
    itself; otherwise the format's instructions join the system message, and past calls in
    assistant messages are written out in the format."""
    if setup is None and not any(m.get("tool_calls") for m in messages):
        return messages, None
    knows_tools = "tools" in template
    knows_calls = "tool_calls" in template
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls and not knows_calls:
            text = "".join(fmt.render_call(c["function"]["name"], c["function"]["arguments"])
                           for c in calls)
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = (m.get("content") or "") + text
        out.append(m)
    shown = setup.shown if setup is not None else []
    if not shown:
        return out, None
    if knows_tools:
        return out, setup.openai_tools()
    text = fmt.instructions(shown)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out, None
