"""Stop strings applied on the client side, for APIs that may not apply them all (Gemini
takes at most 5; LiteLLM's providers differ): text that may begin a stop string is held
back until the next piece shows whether it does."""

from __future__ import annotations

from typing import Optional

from asgl.lang.sampling import truncate_at_stop


class StopFilter:
    def __init__(self, stops: list[str]):
        self.stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._text = ""
        self._sent = 0
        self.hit: Optional[str] = None  # the stop string met, once met

    def feed(self, piece: str) -> str:
        """The new text that is safe to show (never past a stop string)."""
        if self.hit is not None:
            return ""
        self._text += piece
        cut, self.hit = truncate_at_stop(self._text, self.stops)
        end = len(cut) if self.hit is not None else max(self._sent, len(self._text) - self._hold)
        out, self._sent = self._text[self._sent:end], max(self._sent, end)
        return out

    def finish(self) -> str:
        """What was held back, at the end of the answer."""
        if self.hit is not None:
            return ""
        out, self._sent = self._text[self._sent:], len(self._text)
        return out
