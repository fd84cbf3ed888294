"""Reasoning parsers (`--reasoning-parser`): split a reasoning model's output into
`reasoning_content` and `content`, incrementally, as SGLang and vLLM do.

`feed(text)` returns (reasoning delta, content delta); `finish()` flushes what was held
back. A non-streamed response feeds the whole text through the same parser, so streamed
and non-streamed answers agree wherever the text is split. Reasoning has the whitespace
around it dropped, and content the whitespace that leads it (SGLang strips both).

Families (the published output formats):
  deepseek-r1     reasoning</think>content      the template opens <think> in the prompt;
                                                 the output may repeat it; no </think>:
                                                 all reasoning (cut off while thinking)
  qwen3, glm45    <think>reasoning</think>content  reasoning only when the output opens
                                                 with <think> (else all content)
  qwen3-thinking  as deepseek-r1 (Qwen3 *-Thinking-2507 templates open <think> themselves)
  kimi            ◁think▷reasoning◁/think▷content
  gpt-oss         harmony channels: <|channel|>analysis<|message|>reasoning<|end|>
                  <|start|>assistant<|channel|>final<|message|>content; a commentary
                  message to a tool (`to=functions.f`) is passed on to content as harmony
                  text for the gpt-oss tool parser. Needs the special tokens in the text.
"""

from __future__ import annotations

from typing import Optional

_WS = " \t\r\n"


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    """Base: collects (reasoning, content) pieces and keeps the whitespace rules."""

    # whether the parser reads special tokens (the request must keep them in the text)
    needs_special_tokens = False

    def __init__(self) -> None:
        self.reasoning = ""  # totals so far
        self.content = ""
        self._r_out: list[str] = []
        self._c_out: list[str] = []
        self._r_ws = ""  # trailing whitespace of the reasoning, held until text follows
        self._c_started = False

    def feed(self, text: str) -> tuple[str, str]:
        self._consume(text, final=False)
        return self._take()

    def finish(self) -> tuple[str, str]:
        self._consume("", final=True)
        self._r_ws = ""
        return self._take()

    def _consume(self, text: str, final: bool) -> None:
        raise NotImplementedError

    def _reason(self, text: str) -> None:
        text = self._r_ws + text
        if not self.reasoning and not self._r_out:
            text = text.lstrip(_WS)
        body = text.rstrip(_WS)
        self._r_ws = text[len(body):]
        if body:
            self._r_out.append(body)
            self.reasoning += body

    def _end_reasoning(self) -> None:
        self._r_ws = ""

    def _content(self, text: str) -> None:
        if not self._c_started:
            text = text.lstrip(_WS)
            if not text:
                return
            self._c_started = True
        self._c_out.append(text)
        self.content += text

    def _take(self) -> tuple[str, str]:
        r, c = "".join(self._r_out), "".join(self._c_out)
        self._r_out, self._c_out = [], []
        return r, c


class ThinkTagParser(ReasoningParser):
    """<start>reasoning<end>content. `forced`: the output starts inside the reasoning (the
    prompt opened it), with or without a repeated start tag."""

    def __init__(self, start: str, end: str, forced: bool):
        super().__init__()
        self.start, self.end, self.forced = start, end, forced
        self._buf = ""
        self._state = "head"  # head (start tag undecided) | reasoning | content

    def _consume(self, text: str, final: bool) -> None:
        self._buf += text
        while True:
            if self._state == "head":
                head = self._buf.lstrip(_WS)
                if head.startswith(self.start):
                    self._buf, self._state = head[len(self.start):], "reasoning"
                    continue
                if self.start.startswith(head) and not final:
                    return  # could still be the start tag
                self._state = "reasoning" if self.forced else "content"
                continue
            if self._state == "reasoning":
                i = self._buf.find(self.end)
                if i >= 0:
                    self._reason(self._buf[:i])
                    self._end_reasoning()
                    self._buf, self._state = self._buf[i + len(self.end):], "content"
                    continue
                keep = 0 if final else partial_suffix(self._buf, self.end)
                self._reason(self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return
            self._content(self._buf)
            self._buf = ""
            return


# harmony's markers (openai/harmony): a message is <|start|>header<|message|>body<|end|>;
# the last one of a completion ends with <|return|> or <|call|> (stop tokens: usually absent
# from the text)
_H_START, _H_CHANNEL, _H_MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
_H_ENDS = ("<|end|>", "<|return|>", "<|call|>")
_H_MARKERS = (_H_START, _H_CHANNEL, _H_MESSAGE) + _H_ENDS


class HarmonyReasoningParser(ReasoningParser):
    """gpt-oss: the analysis channel is reasoning, the final channel content; a commentary
    message with a recipient (a tool call) goes to content as harmony text, unparsed."""

    needs_special_tokens = True

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._state = "header"  # header | body
        self._header = ""
        self._route = "content"  # where the body goes: reasoning | content | raw
        self._header_known = False  # after a message ends, a header surely follows

    def _consume(self, text: str, final: bool) -> None:
        self._buf += text
        while self._buf:
            if self._state == "header":
                pending = self._header + self._buf
                i = pending.find(_H_MESSAGE)
                if i < 0:
                    if final:  # cut off inside a header: nothing to show
                        self._header = self._buf = ""
                        return
                    if self._header_known or pending.startswith("<|") or \
                            "<|".startswith(pending):
                        self._header, self._buf = pending, ""
                        return
                    self._header = ""
                    self._route, self._state = "content", "body"  # no header: plain text
                    continue
                self._header, self._buf = "", pending[i + len(_H_MESSAGE):]
                self._open(pending[:i])
                continue
            end, j = _first_marker(self._buf, _H_ENDS + (_H_START,))
            if j < 0:
                keep = 0 if final else max(partial_suffix(self._buf, m) for m in _H_MARKERS)
                self._body(self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                if final:
                    self._close()
                return
            self._body(self._buf[:j])
            self._close()
            self._header_known = True
            self._buf = self._buf[j + len(end):] if end != _H_START else self._buf[j:]
            self._state = "header"

    def _open(self, header: str) -> None:
        header = header[len(_H_START):] if header.startswith(_H_START) else header
        words = header.split(_H_CHANNEL, 1)[1].split() if _H_CHANNEL in header else []
        channel = words[0] if words else ""
        recipient = "to=" in header
        if channel == "analysis" and not recipient:
            self._route = "reasoning"
        elif recipient:
            self._route = "raw"
            self._content(_H_START + header + _H_MESSAGE)
        else:
            self._route = "content"
        self._state = "body"

    def _body(self, text: str) -> None:
        if not text:
            return
        if self._route == "reasoning":
            self._reason(text)
        else:
            self._content(text)

    def _close(self) -> None:
        if self._route == "reasoning":
            self._end_reasoning()
        elif self._route == "raw":  # the gpt-oss tool parser reads a call up to here
            self._content(_H_ENDS[0])


def _first_marker(text: str, markers: tuple[str, ...]) -> tuple[str, int]:
    best, at = "", -1
    for m in markers:
        i = text.find(m)
        if i >= 0 and (at < 0 or i < at):
            best, at = m, i
    return best, at


def _deepseek() -> ReasoningParser:
    return ThinkTagParser("<think>", "</think>", forced=True)


def _qwen3() -> ReasoningParser:
    return ThinkTagParser("<think>", "</think>", forced=False)


PARSERS = {
    "deepseek-r1": _deepseek,
    "deepseek-v3": _qwen3,  # V3.1 hybrid: thinks only when the output opens <think>
    "qwen3": _qwen3,
    "qwen3-thinking": _deepseek,
    "glm45": _qwen3,
    "kimi": lambda: ThinkTagParser("\u25c1think\u25b7", "\u25c1/think\u25b7", forced=False),
    "gpt-oss": HarmonyReasoningParser,
}
_ALIASES = {"deepseek_r1": "deepseek-r1", "qwen3_thinking": "qwen3-thinking",
            "gpt_oss": "gpt-oss", "openai_gptoss": "gpt-oss", "glm4_moe": "glm45",
            "deepseek_v3": "deepseek-v3"}


def check_name(name: Optional[str]) -> Optional[str]:
    """The canonical --reasoning-parser name; ValueError naming the known ones."""
    if name is None:
        return None
    key = _ALIASES.get(name, name)
    if key not in PARSERS:
        raise ValueError(f"unknown --reasoning-parser {name!r} (known: "
                         f"{', '.join(sorted(set(PARSERS) | set(_ALIASES)))})")
    return key


def make_parser(name: str, thinking: Optional[bool] = None) -> Optional[ReasoningParser]:
    """A fresh parser for one choice; None when `thinking` is False (the request turned
    thinking off through chat_template_kwargs: the output is all content)."""
    if thinking is False:
        return None
    return PARSERS[check_name(name)]()
