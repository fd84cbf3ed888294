"""Incremental detokenization with stop strings, one object per request.

Owner: the event loop (the output processor calls `step` with each new token). It
keeps no copy of the text it emitted: the request's stream assembles that.

Text is produced by decoding a small window of recent ids, never the whole output:
`ids[prefix:read]` was already turned into text, so decoding `ids[prefix:]` and dropping
the (unchanged) text of `ids[prefix:read]` gives the new text with the right spacing and
byte merging at the seam. Text ending in U+FFFD is an incomplete UTF-8 sequence: wait for
more tokens. The window starts a few prompt tokens back, so that a tokenizer that strips
the leading space of a decoded sequence (SentencePiece) renders the first output token's
space as in the full text. With a fast (Rust) tokenizer the window is the tokenizers
library's `DecodeStream`, which runs that algorithm in one call per step instead of two
decodes in Python.

Stop strings: the earliest-ending occurrence wins, even when it spans tokens. Nothing past
the stop string is ever emitted, nor the stop string itself unless `no_stop_trim`. The
longest suffix of the new text that could still begin a stop string is held back until it
is resolved (with very long stops: the last len(longest) - 1 characters); `flush()`
releases it (and any trailing incomplete bytes) at the end. Each step searches only the
held-back text and the new text, so the work per token is bounded by the stops, whatever
the length of the output.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

try:  # tokenizers >= 0.21; a list of ids per step from 0.22
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: the Python window below
    DecodeStream = None

# Prompt tokens the window reaches back: enough context for a leading space or a
# multi-token character at the prompt/output seam.
_PROMPT_CONTEXT = 5
# Consumed ids kept before the window is compacted (bounds memory on long outputs).
_COMPACT_AT = 64
# Characters of stop-string prefixes a request may keep for an exact hold-back: past this,
# building and probing them would cost more than the hold saves (per request, on the loop).
_PRECISE_HOLD_CHARS = 1 << 16


def _rust_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer when `tokenizer.decode` is exactly its decode (an HF fast
    tokenizer without Python-side space clean-up), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return backend
    return None


def _decoder(tokenizer: Any, skip_special_tokens: bool,
             spaces_between_special_tokens: bool) -> Callable[[list[int]], str]:
    """ids -> text, as `tokenizer.decode` would give it."""
    backend = _rust_backend(tokenizer)
    if backend is not None:
        # HF fast tokenizer: its decode is exactly the backend's; skip the Python wrapper.
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    # Slow tokenizers honour spaces_between_special_tokens; fast ones ignore it. With
    # clean_up_tokenization_spaces the cleanup runs per window, which can differ from a
    # whole-text decode only right at a window seam (" ." style pairs).
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=spaces_between_special_tokens)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True, stop_strings: Iterable[str] = (),
                 no_stop_trim: bool = False):
        self._decode = _decoder(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        if self._decode(self._ids).endswith("\ufffd"):
            # the prompt ends inside a UTF-8 sequence: no clean seam to continue from
            self._ids = []
        self._prefix = 0  # ids[prefix:read] are decoded context for the seam
        self._read = len(self._ids)  # ids[read:] are not turned into text yet
        # The Rust window: it keeps its own ids; ours then only hold the ids since the
        # last emitted text after the context that emitted it (what `flush` must decode).
        self._backend = _rust_backend(tokenizer) if DecodeStream is not None else None
        self._stream = None
        if self._backend is not None:
            self._stream = DecodeStream(ids=list(self._ids),
                                        skip_special_tokens=skip_special_tokens)
        self._stops = [s for s in stop_strings if s]
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
        # every proper prefix of a stop string: what a held-back tail may look like. They
        # hold sum(len^2)/2 characters, so past a bound (long stops) the last max_hold
        # characters are held back instead: the same text, a little later in the stream.
        self._stop_prefixes: Optional[set[str]] = None
        if sum(len(s) * len(s) for s in self._stops) // 2 <= _PRECISE_HOLD_CHARS:
            self._stop_prefixes = {s[:i] for s in self._stops for i in range(1, len(s))}
        self._no_stop_trim = no_stop_trim
        self._held = ""  # decoded text not yet emitted (could start a stop string)
        self.matched_stop: Optional[str] = None

    @property
    def stopped(self) -> bool:
        return self.matched_stop is not None

    def step(self, new_ids: list[int]) -> tuple[str, Optional[str]]:
        """Feed new token ids; returns (text to emit now, the stop string matched or None).

        After a stop string matched, further calls return ("", None)."""
        if self.stopped:
            return "", None
        self._ids.extend(new_ids)
        new_text = self._decode_new() if self._stream is None else self._stream_new(new_ids)
        if not new_text:
            return "", None
        return self._emit(self._held + new_text)

    def flush(self) -> str:
        """At the end of generation: release held-back and still-incomplete text.

        Stop strings still apply to what is released (`matched_stop` is set if one is found).
        """
        if self.stopped:
            return ""
        pending = self._held
        if self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix:self._read])
            pending += self._decode(self._ids[self._prefix:])[len(prefix_text):]
            self._prefix = self._read = len(self._ids)
        self._held = ""
        hit = self._find_stop(pending) if self._stops else None
        if hit is not None:
            return self._stop_at(pending, *hit)
        return pending

    # ------------------------------------------------------------------ internals
    def _stream_new(self, new_ids: list[int]) -> str:
        text = self._stream.step(self._backend, new_ids if len(new_ids) > 1 else new_ids[0])
        if text is None:
            return ""
        # emitted: what follows is decoded after the ids just turned into text, as the
        # Rust window does (ids[prefix:read] context, nothing unread)
        del self._ids[:self._read]
        self._prefix, self._read = 0, len(self._ids)
        return text

    def _decode_new(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        if len(full) <= len(prefix_text) or full.endswith("\ufffd"):
            return ""  # nothing new, or a UTF-8 sequence still incomplete: wait
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > _COMPACT_AT:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return full[len(prefix_text):]

    def _emit(self, pending: str) -> tuple[str, Optional[str]]:
        """Emit `pending` up to a stop string or up to a possible stop-string start."""
        if not self._stops:
            return pending, None
        hit = self._find_stop(pending)
        if hit is not None:
            return self._stop_at(pending, *hit), hit[1]
        hold = self._hold_len(pending)
        delta = pending[:len(pending) - hold]
        self._held = pending[len(pending) - hold:]
        return delta, None

    def _stop_at(self, pending: str, start: int, stop: str) -> str:
        delta = pending[:start + len(stop)] if self._no_stop_trim else pending[:start]
        self.matched_stop = stop
        self._held = ""
        return delta

    def _find_stop(self, text: str) -> Optional[tuple[int, str]]:
        """The stop string occurrence that ends first (ties: the one starting first)."""
        best: Optional[tuple[int, int, str]] = None
        for s in self._stops:
            i = text.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        return None if best is None else (best[1], best[2])

    def _hold_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string
        (or of the longest possible one, with stops too long for the prefix set)."""
        if self._stop_prefixes is None:
            return min(self._max_hold, len(text))
        for k in range(min(self._max_hold, len(text)), 0, -1):
            if text[-k:] in self._stop_prefixes:
                return k
        return 0
