"""Tool-call parsers for the formats beside hermes and llama3 (tool_parsers.py): mistral,
qwen3_coder (XML), deepseekv3, deepseekv31, kimi_k2 and glm45 here; pythonic and gpt-oss
(harmony) in tool_parsers_pythonic.py and tool_parsers_harmony.py. Each is written from
its model family's published chat format.

They share one shape (`SectionCallParser`): content is streamed up to the marker that
opens a call section (a marker's possible start is held back); inside the section each
call is parsed when its end marker arrives (or the section or the output ends) and sent
whole, as tool_parsers.py does for calls whose arguments are not streamed. Text inside a
section that is no call goes back to content as it was written. Whitespace around calls
is dropped. Arguments always leave as a JSON object's text.

XML-style formats write argument values as text; the tool's parameter schema says which
are strings, and the others are read as JSON (falling back to the text).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Optional

from asgl.server.tool_parsers import ToolCallParser, _partial_suffix

_WS = " \t\r\n"
Call = tuple[str, str]  # (name, arguments as JSON text)


def _args_json(args: Any) -> Optional[str]:
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return json.dumps(args, ensure_ascii=False)


def _json_call(obj: Any) -> Optional[Call]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = _args_json(obj.get("arguments", obj.get("parameters")))
    return None if args is None else (obj["name"], args)


def _typed_value(text: str, schema: Optional[dict]) -> Any:
    """An XML-style argument value: a string parameter keeps its text; any other is read
    as JSON (then as a Python literal: True/None), else kept as text."""
    kind = (schema or {}).get("type")
    if kind == "string":
        return text
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, RecursionError):
            continue
    return text


class SectionCallParser(ToolCallParser):
    start = ""  # opens a call section
    end: Optional[str] = None  # closes it (None: the section runs to the end)
    call_end: Optional[str] = None  # ends one call inside a section

    def __init__(self, tools: Optional[dict[str, dict]] = None):
        super().__init__()
        self.tools = tools or {}  # name -> parameter schema (for typed XML values)
        self._buf = ""
        self._inside = False
        self._ws = ""  # whitespace held until we know whether a call follows
        self._after_call = False

    # --- per format
    def parse_calls(self, text: str) -> Optional[list[Call]]:
        """The calls written in `text` (one call, or what a section holds); None when it
        is no call."""
        raise NotImplementedError

    # --- machinery
    def _consume(self, text: str) -> None:
        self._buf += text
        while self._buf:
            if not self._inside:
                i = self._buf.find(self.start)
                if i < 0:
                    keep = _partial_suffix(self._buf, self.start)
                    self._content(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return
                self._content(self._buf[:i])
                self._ws = ""  # dropped: a call follows
                self._buf = self._buf[i + len(self.start):]
                self._inside = True
                continue
            if not self._scan_section(final=False):
                return

    def _scan_section(self, final: bool) -> bool:
        """Calls out of the section buffer; True when the section closed (more to read)."""
        while self.call_end:
            i = self._buf.find(self.call_end)
            j = self._buf.find(self.end) if self.end else -1
            if i < 0 or (0 <= j < i):
                break
            self._calls(self._buf[:i], self._buf[:i + len(self.call_end)])
            self._buf = self._buf[i + len(self.call_end):]
        j = self._buf.find(self.end) if self.end else -1
        if j >= 0:
            self._calls(self._buf[:j], self._buf[:j], closing=self.end)
            self._buf = self._buf[j + len(self.end):]
            self._inside = False
            return True
        if final:
            self._calls(self._buf, self._buf)
            self._buf = ""
            self._inside = False
        return False

    def _calls(self, text: str, raw: str, closing: str = "") -> None:
        if not text.strip(_WS):
            self._after_call = True
            return
        calls = self.parse_calls(text)
        if not calls:  # no call after all: the model's text as it was
            self._emit_content(self.start + raw + closing)
            return
        for name, args in calls:
            self._emit_args(self._emit_call(name), args)
        self._after_call = True

    def _content(self, text: str) -> None:
        text = self._ws + text
        body = text.rstrip(_WS)
        self._ws = text[len(body):]
        if not body:
            return
        if self._after_call:
            body = body.lstrip(_WS)
            self._after_call = False
        if body:
            self._emit_content(body)

    def _end(self) -> None:
        if self._inside:
            self._scan_section(final=True)
        elif self._buf:
            self._content(self._buf)
        self._buf = ""
        if not self.calls:
            self._emit_content(self._ws)
        self._ws = ""


class MistralParser(SectionCallParser):
    """[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (tokenizer v3-v7), or
    [TOOL_CALLS]name[ARGS]{...} per call (v11+)."""
    start = "[TOOL_CALLS]"

    def parse_calls(self, text: str) -> Optional[list[Call]]:
        calls: list[Call] = []
        for part in text.split(self.start):
            part = part.strip(_WS)
            if not part:
                continue
            if "[ARGS]" in part and not part.startswith(("[", "{")):
                name, _, args = part.partition("[ARGS]")
                args = _args_json(args.strip(_WS))
                if args is None or not name.strip():
                    return None
                calls.append((name.strip(), args))
                continue
            try:
                obj = json.loads(part)
            except ValueError:
                return None
            for item in obj if isinstance(obj, list) else [obj]:
                call = _json_call(item)
                if call is None:
                    return None
                calls.append(call)
        return calls


_QWEN_FN = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_QWEN_PARAM = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)


class Qwen3CoderParser(SectionCallParser):
    """<tool_call>\\n<function=name>\\n<parameter=key>\\nvalue\\n</parameter>\\n...
    </function>\\n</tool_call> (Qwen3-Coder)."""
    start, end = "<tool_call>", "</tool_call>"

    def parse_calls(self, text: str) -> Optional[list[Call]]:
        calls = []
        for m in _QWEN_FN.finditer(text):
            name = m.group(1).strip()
            schema = self.tools.get(name, {}).get("properties", {})
            args = {}
            for p in _QWEN_PARAM.finditer(m.group(2)):
                key = p.group(1).strip()
                value = p.group(2)
                value = value[1:] if value.startswith("\n") else value
                value = value[:-1] if value.endswith("\n") else value
                args[key] = _typed_value(value, schema.get(key))
            calls.append((name, json.dumps(args, ensure_ascii=False)))
        return calls or None


_DS_CALLS_BEGIN, _DS_CALLS_END = "<\uff5ctool\u2581calls\u2581begin\uff5c>", \
    "<\uff5ctool\u2581calls\u2581end\uff5c>"
_DS_CALL_BEGIN, _DS_CALL_END = "<\uff5ctool\u2581call\u2581begin\uff5c>", \
    "<\uff5ctool\u2581call\u2581end\uff5c>"
_DS_SEP = "<\uff5ctool\u2581sep\uff5c>"


class DeepSeekV3Parser(SectionCallParser):
    """<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name\\n```json\\n
    {...}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜> (DeepSeek-V3 / R1-0528)."""
    start, end, call_end = _DS_CALLS_BEGIN, _DS_CALLS_END, _DS_CALL_END

    def parse_calls(self, text: str) -> Optional[list[Call]]:
        text = text.strip(_WS)
        if text.startswith(_DS_CALL_BEGIN):
            text = text[len(_DS_CALL_BEGIN):]
        kind, sep, rest = text.partition(_DS_SEP)
        if not sep:
            return None
        return self._call(kind, rest)

    def _call(self, kind: str, rest: str) -> Optional[list[Call]]:
        name, _, body = rest.partition("\n")
        body = body.strip(_WS)
        if body.startswith("```"):
            body = body[3:]
            body = body[4:] if body.startswith("json") else body
            body = body.rsplit("```", 1)[0]
        args = _args_json(body.strip(_WS))
        return None if args is None or not name.strip() else [(name.strip(), args)]


class DeepSeekV31Parser(DeepSeekV3Parser):
    """<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>name<｜tool▁sep｜>{...}<｜tool▁call▁end｜>
    ...<｜tool▁calls▁end｜> (DeepSeek-V3.1)."""

    def _call(self, kind: str, rest: str) -> Optional[list[Call]]:
        args = _args_json(rest.strip(_WS))
        return None if args is None or not kind.strip() else [(kind.strip(), args)]


class KimiK2Parser(SectionCallParser):
    """<|tool_calls_section_begin|><|tool_call_begin|>functions.name:0
    <|tool_call_argument_begin|>{...}<|tool_call_end|>...<|tool_calls_section_end|>."""
    start, end = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
    call_end = "<|tool_call_end|>"

    def parse_calls(self, text: str) -> Optional[list[Call]]:
        text = text.strip(_WS)
        if text.startswith("<|tool_call_begin|>"):
            text = text[len("<|tool_call_begin|>"):]
        ident, sep, args = text.partition("<|tool_call_argument_begin|>")
        if not sep:
            return None
        name = ident.strip().split(":")[0]
        name = name[len("functions."):] if name.startswith("functions.") else name
        args = _args_json(args.strip(_WS))
        return None if args is None or not name else [(name, args)]


_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


class Glm45Parser(SectionCallParser):
    """<tool_call>name\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n...</tool_call>
    (GLM-4.5)."""
    start, end = "<tool_call>", "</tool_call>"

    def parse_calls(self, text: str) -> Optional[list[Call]]:
        name = text.split("<arg_key>", 1)[0].strip(_WS)
        if not name or "\n" in name or "{" in name:
            return None
        schema = self.tools.get(name, {}).get("properties", {})
        args = {k.strip(): _typed_value(v, schema.get(k.strip()))
                for k, v in _GLM_ARG.findall(text)}
        return [(name, json.dumps(args, ensure_ascii=False))]
