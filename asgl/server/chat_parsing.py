"""One chat choice's output text → reasoning, content and tool-call deltas.

The reasoning parser (--reasoning-parser) runs first; the tool-call parser then reads the
content it passes on, so calls are only ever found in the answer, never in the thinking.
Streamed and non-streamed choices go through the same `ChoiceParser`.
"""

from __future__ import annotations

from typing import Optional

from asgl.server.reasoning_parsers import ReasoningParser
from asgl.server.tool_parsers import CallDelta, ToolCallParser


class ChoiceParser:
    def __init__(self, reasoning: Optional[ReasoningParser],
                 tools: Optional[ToolCallParser]):
        self.reasoning_parser = reasoning
        self.tool_parser = tools
        self.reasoning = ""
        self.content = ""

    def feed(self, text: str) -> tuple[str, str, list[CallDelta]]:
        """(reasoning delta, content delta, call deltas) for new output text."""
        if self.reasoning_parser is not None:
            reasoning, text = self.reasoning_parser.feed(text) if text else ("", "")
        else:
            reasoning = ""
        return self._tools(reasoning, text, final=False)

    def finish(self) -> tuple[str, str, list[CallDelta]]:
        reasoning, text = "", ""
        if self.reasoning_parser is not None:
            reasoning, text = self.reasoning_parser.finish()
        return self._tools(reasoning, text, final=True)

    @property
    def calls(self) -> list:
        return self.tool_parser.calls if self.tool_parser is not None else []

    def _tools(self, reasoning: str, text: str,
               final: bool) -> tuple[str, str, list[CallDelta]]:
        calls: list[CallDelta] = []
        if self.tool_parser is not None:
            text, calls = self.tool_parser.feed(text) if text else ("", [])
            if final:
                more_text, more_calls = self.tool_parser.finish()
                text, calls = text + more_text, calls + more_calls
        self.reasoning += reasoning
        self.content += text
        return reasoning, text, calls
