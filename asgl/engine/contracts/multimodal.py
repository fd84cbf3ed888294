"""Multimodal inputs as they travel server -> engine -> scheduler -> worker.

An image of a prompt becomes an `MMItem`: its preprocessed pixels (host tensors, made off
the event loop by engine/loop/mm_inputs.py), a 64-bit digest of its decoded pixels, and
the run of prompt positions its features fill (`offset`, `length`). The prompt holds the
model's image token at those positions (what the detokenizer and penalties see).

The radix cache does not key those positions by the image token (every image would then
share KV): `MMInputs.cache_ids` puts an id derived from the image's digest there, outside
every vocabulary, so the same image in two requests shares its KV and any other image
differs from its first position on.

Each step, the scheduler hands the worker, in `ForwardBatch.extra["mm"]`, one `MMChunk`
per image whose positions the step computes: which of the image's feature rows go to which
rows of the step's tokens (chunked prefill may split an image across steps). The worker
encodes an image once and keeps its features while later chunks still need them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# Cache ids of image positions: digest-derived, above any vocabulary (ids are int64 keys in
# the radix tree only; they never reach the model).
_PSEUDO_BASE = 1 << 40


@dataclass(eq=False)
class MMItem:
    digest: int  # of the decoded pixels (and the preprocessing's output size)
    offset: int  # first prompt position of its features
    length: int  # feature positions it fills
    # host tensors the model's encoder reads (pixel_values, image_sizes, grid_thw, ...)
    data: dict[str, Any] = field(default_factory=dict)
    modality: str = "image"

    @property
    def cache_id(self) -> int:
        return _PSEUDO_BASE + self.digest % (1 << 62)


@dataclass(eq=False)
class MMInputs:
    items: list[MMItem]

    def cache_ids(self, prompt_ids: list[int]) -> list[int]:
        """The prompt as the radix cache keys it: image positions carry their image's id."""
        ids = list(prompt_ids)
        for item in self.items:
            ids[item.offset:item.offset + item.length] = [item.cache_id] * item.length
        return ids

    def chunks(self, start: int, n: int, row: int) -> list["MMChunk"]:
        """The image rows that prompt positions [start, start + n) need; the step's token
        row of position `start` is `row`."""
        out = []
        for item in self.items:
            lo, hi = max(start, item.offset), min(start + n, item.offset + item.length)
            if lo < hi:
                out.append(MMChunk(item, lo - item.offset, hi - item.offset, row + lo - start))
        return out


@dataclass(eq=False)
class MMChunk:
    item: MMItem
    start: int  # first feature row of the item this step needs
    end: int  # one past the last
    dest: int  # the step's token row of feature row `start`


def feature_rows(chunks: list[MMChunk]) -> Optional[int]:
    """How many token rows a step's chunks fill (None without chunks)."""
    return sum(c.end - c.start for c in chunks) if chunks else None
