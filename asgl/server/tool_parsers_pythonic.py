"""The pythonic tool-call format (Llama 3.2 / Llama 4): `[get_weather(city="Paris"),
get_time()]`, read with Python's own parser (literals only: nothing is evaluated)."""

from __future__ import annotations

import ast
import json
from typing import Optional

from asgl.server.tool_parsers import ToolCallParser
from asgl.server.tool_parsers_extra import Call

_WS = " \t\r\n"


class PythonicParser(ToolCallParser):
    """[get_weather(city="Paris"), get_time()] (Llama 3.2 / Llama 4 pythonic calls): an
    output that opens with "[" (after <|python_start|>, if any) is a list of calls, read
    with Python's parser when its bracket closes; anything else is content."""

    _TAGS = ("<|python_start|>", "<|python_end|>")

    def __init__(self, tools: Optional[dict] = None):
        super().__init__()
        self._mode: Optional[str] = None
        self._buf = ""

    def _consume(self, text: str) -> None:
        if self._mode == "text":
            self._emit_content(text)
            return
        self._buf += text
        if self._mode is None:
            head = self._buf.lstrip(_WS)
            if head.startswith(self._TAGS[0]):
                head = head[len(self._TAGS[0]):].lstrip(_WS)
            if not head or self._TAGS[0].startswith(head):
                return
            if head.startswith("["):
                self._mode = "calls"
            else:
                self._mode = "text"
                self._emit_content(self._buf)
                self._buf = ""

    def _end(self) -> None:
        if self._mode != "calls":
            if self._buf.strip(_WS):
                self._emit_content(self._buf)
            return
        calls = _pythonic_calls(self._buf.strip(_WS).replace(self._TAGS[0], "")
                                .replace(self._TAGS[1], "").strip(_WS))
        if calls is None:
            self._emit_content(self._buf)
            return
        for name, args in calls:
            self._emit_args(self._emit_call(name), args)


def _pythonic_calls(text: str) -> Optional[list[Call]]:
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None
    if not isinstance(tree, ast.List):
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except (ValueError, SyntaxError, RecursionError):
            return None
        if None in args:  # **kwargs
            return None
        calls.append((node.func.id, json.dumps(args, ensure_ascii=False)))
    return calls
