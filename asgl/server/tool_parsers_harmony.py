"""gpt-oss's tool calls, in OpenAI's harmony format: a message whose header names a
recipient `to=functions.NAME` is a call, its body the arguments (JSON)."""

from __future__ import annotations

import re
from typing import Optional

from asgl.server.tool_parsers import ToolCallParser, _partial_suffix
from asgl.server.tool_parsers_extra import _args_json

_WS = " \t\r\n"

_H_MESSAGE, _H_START = "<|message|>", "<|start|>"
_H_ENDS = ("<|end|>", "<|call|>", "<|return|>")


class HarmonyToolParser(ToolCallParser):
    """gpt-oss: a message whose header names a recipient `to=functions.NAME` is a call (its
    body the arguments); the final channel's text, and commentary without a recipient, is
    content; the analysis channel is reasoning (--reasoning-parser gpt-oss shows it). Reads
    raw harmony text or what the gpt-oss reasoning parser passes on."""

    def __init__(self, tools: Optional[dict] = None):
        super().__init__()
        self._buf = ""
        self._header: Optional[str] = ""  # None: inside a body
        self._route = "content"
        self._recipient = ""
        self._args: list[str] = []
        self._seen_marker = False

    def _consume(self, text: str) -> None:
        self._buf += text
        while self._buf:
            if self._header is not None:
                i = self._buf.find(_H_MESSAGE)
                if i < 0:
                    if self._seen_marker or self._buf.lstrip(_WS).startswith(("<|", "assistant")) \
                            or "<|".startswith(self._buf.lstrip(_WS)):
                        return  # a header still arriving
                    self._header, self._route = None, "content"  # plain text
                    continue
                self._open(self._buf[:i])
                self._buf = self._buf[i + len(_H_MESSAGE):]
                continue
            at, marker = _first(self._buf, _H_ENDS + (_H_START,))
            if at < 0:
                keep = max(_partial_suffix(self._buf, m) for m in _H_ENDS + (_H_START,))
                self._body(self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return
            self._body(self._buf[:at])
            self._close()
            self._buf = self._buf[at + (len(marker) if marker != _H_START else 0):]
            self._header = ""
            self._seen_marker = True

    def _open(self, header: str) -> None:
        self._seen_marker = True
        m = re.search(r"to=functions\.([^\s<]+)", header)
        words = header.split("<|channel|>", 1)[1].split() if "<|channel|>" in header else []
        channel = words[0] if words else ""
        self._recipient = m.group(1) if m else ""
        self._route = "call" if m else ("drop" if channel == "analysis" else "content")
        self._header = None
        self._args = []

    def _body(self, text: str) -> None:
        if not text:
            return
        if self._route == "call":
            self._args.append(text)
        elif self._route == "content":
            self._emit_content(text)

    def _close(self) -> None:
        if self._route == "call":
            raw = "".join(self._args)
            args = _args_json(raw.strip(_WS) or "{}")
            if args is None:
                self._emit_content(raw)
            else:
                self._emit_args(self._emit_call(self._recipient), args)
        self._route = "content"
        self._args = []

    def _end(self) -> None:
        if self._header is None:
            self._body(self._buf)
            self._close()
        elif self._buf.strip(_WS) and not self._seen_marker:
            self._emit_content(self._buf)
        self._buf = ""


def _first(text: str, markers: tuple[str, ...]) -> tuple[int, str]:
    best, found = -1, ""
    for m in markers:
        i = text.find(m)
        if i >= 0 and (best < 0 or i < best):
            best, found = i, m
    return best, found
