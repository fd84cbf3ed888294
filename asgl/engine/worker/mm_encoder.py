"""Image features on the worker thread: each image encoded once, scattered into a step's
input embeddings.

The scheduler's `ForwardBatch.extra["mm"]` lists, per image the step computes positions
of, which of its feature rows go to which token rows (engine/contracts/multimodal.py).
Features are kept by the image's digest in a small LRU, so an image split across prefill
chunks, or sent by several requests at once, runs through the vision tower once; images a
radix-cache hit covers entirely are never encoded. The images a step needs are encoded in
one call of the model's `encode_images` (the model batches those of equal shape).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from asgl.engine.contracts.multimodal import MMChunk

# Features of this many images stay on the device (a LLaVA-NeXT-8B image: 2,928 x 4096 bf16,
# 24 MiB). An image's features are needed only until its last prefill chunk ran (a prompt
# is chunked by --chunked-prefill-size, so a few images are in flight at once); later
# requests with the same image share its KV through the radix cache instead.
MAX_CACHED_IMAGES = 16


class MultimodalEncoder:
    def __init__(self, model: Any, device: torch.device, vocab_size: int,
                 max_cached: int = MAX_CACHED_IMAGES):
        self.model = model
        self.vocab_size = vocab_size
        self.device = device
        self.max_cached = max_cached
        self._features: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.images_encoded = 0  # (tests and stats: how often the tower ran per image)

    def input_embeds(self, ids: torch.Tensor, chunks: list[MMChunk]) -> torch.Tensor:
        """The step's input embeddings: the token embeddings, with image rows replaced."""
        # an image token past the vocabulary (LLaVA-repo checkpoints): its rows are
        # replaced below, any id embeds them
        embeds = self.model.embed_input_ids(torch.where(ids < self.vocab_size, ids, 0))
        missing: dict[int, Any] = {}
        for c in chunks:
            d = c.item.digest
            if d in self._features:
                self._features.move_to_end(d)
            elif d not in missing:
                missing[d] = c.item
        if missing:
            items = list(missing.values())
            feats = self.model.encode_images(items, self.device)
            for item, f in zip(items, feats):
                if f.shape[0] != item.length:
                    raise RuntimeError(f"image features have {f.shape[0]} rows, the prompt "
                                       f"holds {item.length} positions for them")
                self._features[item.digest] = f
            self.images_encoded += len(items)
        for c in chunks:
            f = self._features[c.item.digest]
            embeds[c.dest:c.dest + c.end - c.start] = f[c.start:c.end].to(embeds.dtype)
        while len(self._features) > self.max_cached:
            self._features.popitem(last=False)
        return embeds
