"""Incremental tool-call parsers: one choice's output text -> content and call deltas.

`feed(text)` returns a content delta and call deltas (a call's id and name once, then
pieces of its arguments, as OpenAI streams them); `finish()` flushes what is held back.
A non-streamed response feeds the whole text through the same parser, so both carry the
same calls with the same arguments. A call written `{"name": ..., "arguments": {...}}`
(or "parameters") has its arguments passed on as raw JSON text while they are generated;
a call in any other shape is parsed when it is complete and sent whole; text that is no
call stays content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Optional

_WS = " \t\r\n"


@dataclass
class CallDelta:
    index: int
    id: Optional[str] = None  # with the name, on a call's first delta
    name: Optional[str] = None
    arguments: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class _Events:
    content: list[str] = field(default_factory=list)
    calls: list[CallDelta] = field(default_factory=list)


class ToolCallParser:
    """Incremental: feed text deltas, get (content delta, call deltas) back; `calls` and
    `content` hold the totals."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.content = ""
        self._out = _Events()

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        self._consume(text)
        return self._take()

    def finish(self) -> tuple[str, list[CallDelta]]:
        self._end()
        return self._take()

    # emitted by subclasses
    def _emit_content(self, text: str) -> None:
        if text:
            self._out.content.append(text)
            self.content += text

    def _emit_call(self, name: str) -> int:
        call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, "")
        self.calls.append(call)
        index = len(self.calls) - 1
        self._out.calls.append(CallDelta(index, call.id, name, ""))
        return index

    def _emit_args(self, index: int, text: str) -> None:
        if not text:
            return
        self.calls[index].arguments += text
        last = self._out.calls[-1] if self._out.calls else None
        if last is not None and last.index == index:
            last.arguments += text  # one delta per call per feed
        else:
            self._out.calls.append(CallDelta(index, arguments=text))

    def _take(self) -> tuple[str, list[CallDelta]]:
        out, self._out = self._out, _Events()
        return "".join(out.content), out.calls

    def _consume(self, text: str) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError


class _CallScanner:
    """Reads one call object, `{"name": <string>, "arguments"|"parameters": {...}}`,
    character by character. In that shape the arguments are passed on as they arrive;
    at the first deviation before them it stops and the caller parses the whole call
    when it ends (`raw` keeps every character)."""

    _SHAPE = ("{", "key:name", ":", "name", ",", "key:args", ":", "args")

    def __init__(self, parser: ToolCallParser):
        self.parser = parser
        self.raw: list[str] = []
        self.state = 0  # index into _SHAPE; len(_SHAPE): after the arguments
        self.deviated = False
        self.index: Optional[int] = None  # the call's index once its header is out
        self._str: Optional[list[str]] = None  # a string being read (raw, quotes included)
        self._escape = False
        self._depth = 0  # of the arguments value
        self._in_args_string = False
        self._name = ""
        self.total_depth = 0  # of the whole object (string-aware): 0 again = complete
        self._in_string = False
        self._esc_total = False
        self.started = False

    @property
    def complete(self) -> bool:
        return self.started and self.total_depth == 0

    def feed(self, text: str) -> None:
        args: list[str] = []
        for ch in text:
            if self.complete:
                break
            self.raw.append(ch)
            self._track(ch)
            if not self.deviated:
                self._step(ch, args)
        if args and self.index is not None:
            self.parser._emit_args(self.index, "".join(args))

    def _track(self, ch: str) -> None:
        if self._in_string:
            if self._esc_total:
                self._esc_total = False
            elif ch == "\\":
                self._esc_total = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self.started = True
            self.total_depth += 1
        elif ch in "}]":
            self.total_depth -= 1

    def _step(self, ch: str, args: list[str]) -> None:
        shape = self._SHAPE
        if self.state == len(shape):
            return  # after the arguments: the rest of the object is skipped
        want = shape[self.state]
        if want == "args":
            self._args_char(ch, args)
            return
        if self._str is not None:  # inside a key or the name
            self._str.append(ch)
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._string_done(want)
            return
        if ch in _WS:
            return
        if want in ("{", ":", ","):
            if ch == want:
                self.state += 1
            else:
                self.deviated = True
        elif ch == '"':
            self._str = [ch]
        else:
            self.deviated = True

    def _string_done(self, want: str) -> None:
        try:
            value = json.loads("".join(self._str))
        except ValueError:
            value = None
        self._str = None
        if want == "key:name" and value == "name":
            self.state += 1
        elif want == "name" and isinstance(value, str):
            self._name = value
            self.state += 1
        elif want == "key:args" and value in ("arguments", "parameters"):
            self.state += 1
        else:
            self.deviated = True

    def _args_char(self, ch: str, args: list[str]) -> None:
        if self._depth == 0:
            if ch in _WS:
                return
            if ch != "{":
                self.deviated = True
                return
            self.index = self.parser._emit_call(self._name)
        args.append(ch)
        if self._in_args_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_args_string = False
        elif ch == '"':
            self._in_args_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 0:
                self.state += 1

    def close(self) -> Optional[str]:
        """At the end of the call's text: None if it was handled; else the raw text, when
        it is no call at all (the caller shows it as content)."""
        if self.index is not None:
            return None  # streamed (complete, or cut off by the length limit)
        raw = "".join(self.raw)
        call = _parse_call(raw)
        if call is None:
            return raw
        self.parser._emit_args(self.parser._emit_call(call[0]), call[1])
        return None


def _parse_call(raw: str) -> Optional[tuple[str, str]]:
    """(name, arguments JSON) of a call object in any shape, or None."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


class TaggedCallParser(ToolCallParser):
    """Calls between an open and a close tag; text outside them is content (whitespace
    around calls is dropped)."""

    def __init__(self, open_tag: str, close_tag: str):
        super().__init__()
        self.open, self.close = open_tag, close_tag
        self._buf = ""
        self._ws = ""  # whitespace held until we know whether a call follows
        self._after_call = False
        self._ws_before = ""
        self._call: Optional[_CallScanner] = None

    def _consume(self, text: str) -> None:
        self._buf += text
        while self._buf:
            if self._call is None:
                if not self._outside():
                    return
            elif not self._inside():
                return

    def _outside(self) -> bool:
        """Content up to the next open tag; False when more text is needed."""
        buf = self._buf
        i = buf.find(self.open)
        if i < 0:
            keep = _partial_suffix(buf, self.open)
            self._content(buf[:len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        self._content(buf[:i])
        self._ws_before, self._ws = self._ws, ""  # dropped if a call follows
        self._buf = buf[i + len(self.open):]
        self._call = _CallScanner(self)
        return True

    def _content(self, text: str) -> None:
        """Text outside calls. Trailing whitespace is held until we know what follows: a
        call drops it; other text takes it along (except right after a call)."""
        text = self._ws + text
        body = text.rstrip(_WS)
        self._ws = text[len(body):]
        if not body:
            return
        if self._after_call:
            body = body.lstrip(_WS)
            self._after_call = False
        self._emit_content(body)

    def _inside(self) -> bool:
        buf = self._buf
        i = buf.find(self.close)
        if i < 0:
            keep = _partial_suffix(buf, self.close)
            self._call.feed(buf[:len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        self._call.feed(buf[:i])
        self._end_call(self.open + "".join(self._call.raw) + self.close)
        self._buf = buf[i + len(self.close):]
        return True

    def _end_call(self, whole: str) -> None:
        rest = self._call.close()
        self._call = None
        if rest is not None:  # not a call after all: the model's text as it was
            self._emit_content(self._ws_before + whole)
        else:
            self._after_call = True
        self._ws_before = ""

    def _end(self) -> None:
        if self._call is not None:  # cut off inside a call
            if self._buf:
                self._call.feed(self._buf)
            self._end_call(self.open + "".join(self._call.raw))
        elif self._buf:
            self._content(self._buf)
        self._buf = ""
        if not self.calls:
            self._emit_content(self._ws)  # plain text keeps its trailing whitespace
        self._ws = ""


class JsonCallParser(ToolCallParser):
    """Llama 3 style: the output is either text (content) or JSON call objects separated
    by ';' (decided at its first non-space character; `<|python_tag|>` may precede)."""

    _TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._mode: Optional[str] = None  # None (undecided) | "text" | "calls"
        self._lead = ""
        self._call: Optional[_CallScanner] = None
        self._tail = ""  # text after the last call that is not a separator

    def _consume(self, text: str) -> None:
        if self._mode == "text":
            self._emit_content(text)
            return
        if self._mode is None:
            self._lead += text
            head = self._lead.lstrip(_WS)
            if not head or (self._TAG.startswith(head) and head != self._TAG):
                return
            if head.startswith(self._TAG):
                head = head[len(self._TAG):]
                self._lead = head
                if not head.lstrip(_WS):
                    self._mode = "calls"
                    return
            if head.lstrip(_WS).startswith("{"):
                self._mode = "calls"
                text, self._lead = head, ""
            else:
                self._mode = "text"
                self._emit_content(self._lead)
                self._lead = ""
                return
        self._calls(text)

    def _calls(self, text: str) -> None:
        i = 0
        while i < len(text):
            if self._call is None:
                ch = text[i]
                if self._tail or ch not in _WS + ";":
                    if ch == "{" and not self._tail:
                        self._call = _CallScanner(self)
                        continue
                    self._tail += ch
                i += 1
                continue
            before = len(self._call.raw)
            self._call.feed(text[i:])
            i += len(self._call.raw) - before
            if self._call.complete:
                self._finish_call()

    def _finish_call(self) -> None:
        rest = self._call.close()
        self._call = None
        if rest is not None:
            self._emit_content(rest)

    def _end(self) -> None:
        if self._mode is None and self._lead.strip(_WS):
            self._emit_content(self._lead)
        if self._call is not None:
            self._finish_call()
        if self._tail.strip(_WS):
            self._emit_content(self._tail)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
