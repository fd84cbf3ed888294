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

Multimodal RoPE (Qwen2-VL): an image's positions carry 3-D rotary positions (temporal,
row, column: `MMItem.mrope`, relative to the image's first rotary position) and advance the
rotary position by `MMItem.advance` (its largest grid side), not by its length. Text keeps
1-D positions (the three components equal), shifted by what the images before it saved:
`MMInputs.positions` gives the scheduler those shifted 1-D positions (decode steps too,
so they need no 3-D positions and replay CUDA graphs as before), and each `MMChunk`
carries its image's first rotary position for the model to build the 3-D rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    # M-RoPE: [3, length] rotary positions relative to the image's first one, and how far
    # the image advances the rotary position (None / 0: plain 1-D positions)
    mrope: Any = None
    advance: int = 0

    @property
    def cache_id(self) -> int:
        return _PSEUDO_BASE + self.digest % (1 << 62)


@dataclass(eq=False)
class MMInputs:
    items: list[MMItem]
    # rotary shift (rotary position - sequence index) in force from each item's first
    # position, and after it; empty without M-RoPE
    shift_before: list[int] = field(default_factory=list)
    shift_after: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if any(it.mrope is not None for it in self.items):
            shift = 0
            for it in self.items:
                self.shift_before.append(shift)
                shift += it.advance - it.length
                self.shift_after.append(shift)

    @property
    def final_shift(self) -> int:
        """The shift of every position after the last image (the rest of the prompt and
        the output)."""
        return self.shift_after[-1] if self.shift_after else 0

    def positions(self, start: int, n: int) -> list[int]:
        """1-D rotary positions of sequence positions [start, start + n): each shifted by
        the images before it (an image's own rows are shifted as its first one; the model
        replaces them with their 3-D positions)."""
        out = []
        for p in range(start, start + n):
            shift = 0
            for it, before, after in zip(self.items, self.shift_before, self.shift_after):
                if p < it.offset:
                    break
                shift = before if p < it.offset + it.length else after
            out.append(p + shift)
        return out

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
        for k, item in enumerate(self.items):
            lo, hi = max(start, item.offset), min(start + n, item.offset + item.length)
            if lo < hi:
                rope = item.offset + self.shift_before[k] if self.shift_before else 0
                out.append(MMChunk(item, lo - item.offset, hi - item.offset, row + lo - start,
                                   rope))
        return out


@dataclass(eq=False)
class MMChunk:
    item: MMItem
    start: int  # first feature row of the item this step needs
    end: int  # one past the last
    dest: int  # the step's token row of feature row `start`
    rope_start: int = 0  # M-RoPE: the image's first rotary position (MMItem.mrope adds to it)
