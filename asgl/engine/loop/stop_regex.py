"""Stop regexes (SGLang's `stop_regex` sampling parameter): generation ends where one of
the patterns first matches the output text.

`RegexStopDetokenizer` wraps a request's incremental detokenizer and has its interface
(`step`, `flush`, `matched_stop`), so the output processor treats a regex stop exactly as
a stop string: the finish reason is `{"type": "stop", "matched": <the matched text>}` and
the text from the match on is trimmed (kept with `no_stop_trim`).

Text that may still become a match is held back, like a stop string's possible start:
the `regex` module's partial matching tells where a match could begin, so streamed and
non-streamed outputs are the same and never show text that a later match trims. The hold
is bounded (a pattern such as `a.*b` could otherwise hold the rest of the output): past
`MAX_HOLD_CHARS` the oldest held text is released and can no longer start a match.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import regex

from asgl.engine.contracts.errors import InvalidRequest

MAX_HOLD_CHARS = 1024
MAX_PATTERNS = 16


def compile_stop_regexes(patterns: Sequence[str]) -> regex.Pattern:
    """One alternation of the patterns; InvalidRequest naming `stop_regex` if one is bad."""
    if len(patterns) > MAX_PATTERNS:
        raise InvalidRequest(f"{len(patterns)} stop regexes; the limit is {MAX_PATTERNS}",
                             "stop_regex")
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise InvalidRequest("stop_regex entries must be non-empty strings", "stop_regex")
        try:
            compiled = regex.compile(p)
        except regex.error as e:
            raise InvalidRequest(f"stop_regex {p!r} is not a valid regex: {e}",
                                 "stop_regex") from None
        if compiled.fullmatch(""):  # it would stop before the first token
            raise InvalidRequest(f"stop_regex {p!r} matches the empty string", "stop_regex")
    return regex.compile("|".join(f"(?:{p})" for p in patterns))


class RegexStopDetokenizer:
    """A detokenizer (IncrementalDetokenizer's interface) that also stops at a regex."""

    def __init__(self, inner: Any, pattern: regex.Pattern, no_stop_trim: bool = False):
        self._inner = inner
        self._pattern = pattern
        self._no_stop_trim = no_stop_trim
        self._held = ""  # text the inner detokenizer released that may start a match
        self._regex_stop: Optional[str] = None

    @property
    def matched_stop(self) -> Optional[str]:
        return self._regex_stop if self._regex_stop is not None else self._inner.matched_stop

    @property
    def stopped(self) -> bool:
        return self.matched_stop is not None

    def step(self, new_ids: list[int]) -> tuple[str, Optional[str]]:
        if self._regex_stop is not None:
            return "", None
        text, matched = self._inner.step(new_ids)
        return self._scan(text, matched, final=matched is not None)

    def flush(self) -> str:
        if self.stopped:
            return ""
        text, _ = self._scan(self._inner.flush(), self._inner.matched_stop, final=True)
        return text

    def _scan(self, text: str, matched: Optional[str], final: bool) -> tuple[str, Optional[str]]:
        pending = self._held + text
        self._held = ""
        if not pending:
            return "", matched
        m = self._pattern.search(pending, partial=not final)
        if m is not None and not m.partial and m.end() > m.start():
            self._regex_stop = m.group()
            return (pending[:m.end()] if self._no_stop_trim else pending[:m.start()],
                    self._regex_stop)
        if m is not None and m.partial and m.start() < len(pending):
            start = max(m.start(), len(pending) - MAX_HOLD_CHARS)
            self._held = pending[start:]
            return pending[:start], matched
        return pending, matched
