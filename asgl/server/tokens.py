"""Token id → text for logprob tables (OpenAI `tokens`/`top_logprobs`, SGLang's
`return_text_in_logprobs`).

Each id is decoded on its own, like vLLM does, and remembered: a vocabulary is small and the
same ids recur, so a table of logprobs costs dictionary lookups, not tokenizer calls.
"""

from __future__ import annotations

from typing import Any, Optional

# Beyond this many remembered ids stop caching (a vocabulary is ~50k-260k ids; this bounds
# memory if a tokenizer is huge).
_MAX_CACHED = 1 << 18


class TokenTexts:
    def __init__(self, tokenizer: Optional[Any]):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self._tokenizer is None:  # --skip-tokenizer-init: ids only, like vLLM
                text = f"token_id:{token_id}"
            else:
                text = self._tokenizer.decode([token_id])
            if len(self._cache) < _MAX_CACHED:
                self._cache[token_id] = text
        return text

    def texts(self, ids: list[int]) -> list[str]:
        return [self.text(t) for t in ids]

    def decode(self, ids: list[int]) -> str:
        """A whole id sequence as text (echoing a prompt given as ids)."""
        if self._tokenizer is None or not ids:
            return ""
        return self._tokenizer.decode(ids)
