"""One batch of an embedding model on the worker thread: a forward pass without a KV
cache (`ForwardMode.ENCODE`), pooling, Matryoshka truncation and normalization.

The loop side (batching, tokenization, limits) is asgl/engine/loop/embedder.py.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from asgl.engine.contracts.forward_batch import ForwardBatch, ForwardMode


def encode_batch(runner: Any, modes: Sequence[str], normalize: bool, seqs: list[list[int]],
                 dims: list[Optional[int]]) -> list[list[float]]:
    """Pooled (then truncated to dims[i], then normalized) vectors of the token-id lists
    `seqs`, run as one packed forward pass on `runner`'s device."""
    lens = [len(s) for s in seqs]
    with torch.inference_mode():
        batch = ForwardBatch.build(
            mode=ForwardMode.ENCODE, input_ids=[t for s in seqs for t in s],
            positions=[p for n in lens for p in range(n)], out_cache_loc=None,
            req_pool_indices=[0] * len(seqs), prefix_lens=[0] * len(seqs),
            extend_lens=lens, logits_rows=[], sample_rows=[], device=runner.device,
            attn_backend=runner.attn_backend)
        hidden = runner.model(batch.input_ids, batch.positions, batch)
        classify = getattr(runner.model, "classify", None)
        if classify is not None:  # a cross-encoder: its head's logits, as they are
            starts = torch.cumsum(batch.extend_lens, 0) - batch.extend_lens
            return [row.tolist() for row in classify(hidden[starts]).float()]
        pooled = pool(hidden.float(), batch.extend_lens, batch.positions, modes)
        return finish(pooled, dims, normalize)


def pool(hidden: torch.Tensor, lens: torch.Tensor, positions: torch.Tensor,
         modes: Sequence[str]) -> torch.Tensor:
    """[T, H] hidden states of B packed sequences (`lens` [B]) -> [B, H * len(modes)]."""
    B, H = lens.numel(), hidden.shape[-1]
    starts = torch.cumsum(lens, 0) - lens
    seq = torch.repeat_interleave(torch.arange(B, device=hidden.device), lens)  # [T]
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[starts])
        elif mode == "lasttoken":
            out.append(hidden[starts + lens - 1])
        elif mode == "max":
            init = hidden.new_full((B, H), float("-inf"))
            out.append(init.scatter_reduce(0, seq[:, None].expand(-1, H), hidden, "amax"))
        else:
            # weightedmean weighs the token at position p by p + 1 (sentence-transformers)
            w = (positions + 1).to(hidden.dtype) if mode == "weightedmean" else \
                hidden.new_ones(hidden.shape[0])
            sums = hidden.new_zeros(B, H).index_add_(0, seq, hidden * w[:, None])
            total = hidden.new_zeros(B).index_add_(0, seq, w)
            if mode == "mean_sqrt_len_tokens":
                total = total.sqrt()
            out.append(sums / total.clamp(min=1e-9)[:, None])
    return torch.cat(out, dim=-1) if len(out) > 1 else out[0]


def finish(pooled: torch.Tensor, dims: list[Optional[int]], normalize: bool) -> list[list[float]]:
    """Truncate each row to its Matryoshka size (None: keep all), then normalize (L2)."""
    rows = []
    for vec, d in zip(pooled, dims):
        vec = vec[:d] if d else vec
        rows.append(F.normalize(vec, dim=-1) if normalize else vec)
    return [r.tolist() for r in rows]
