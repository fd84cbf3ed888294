"""Vocabulary-parallel embedding and LM head.

The vocabulary is padded to a multiple of `padding_size * tp_size` (so every rank holds the
same number of rows and kernels see aligned shapes) and split into contiguous ranges, one
per rank. Padding rows are zero; `ParallelLMHead.compute_logits` drops their columns.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asgl.distributed import (get_tp_rank, get_tp_size, tensor_model_parallel_all_gather,
                              tensor_model_parallel_all_reduce)
from asgl.layers.utils import set_weight_attrs

DEFAULT_VOCAB_PADDING_SIZE = 64


def pad_vocab_size(vocab_size: int, pad_to: int = DEFAULT_VOCAB_PADDING_SIZE) -> int:
    return -(-vocab_size // pad_to) * pad_to


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 params_dtype: torch.dtype | None = None,
                 padding_size: int = DEFAULT_VOCAB_PADDING_SIZE, prefix: str = ""):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings = num_embeddings  # the real vocabulary
        self.embedding_dim = embedding_dim
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, padding_size * self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        # The last ranks may own fewer real rows (or none): the rest is padding.
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim,
                                               dtype=dtype), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Any = None) -> None:
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ValueError(f"vocabulary tensor has {loaded_weight.shape[0]} rows, the model "
                             f"expects {self.num_embeddings}")
        n = max(0, self.vocab_end - self.vocab_start)
        with torch.no_grad():
            param.data[:n].copy_(loaded_weight.narrow(0, self.vocab_start, n))
            param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids owned by other ranks look up row 0 and are zeroed; the all-reduce fills them in.
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding(torch.where(mine, input_ids - self.vocab_start, 0), self.weight)
        out = out.masked_fill(~mine.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return (f"vocab={self.num_embeddings} (padded {self.num_embeddings_padded}), "
                f"dim={self.embedding_dim}, tp={self.tp_size}")


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharded like the embedding; `tie()` shares the embedding's weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False, **kw):
        super().__init__(num_embeddings, embedding_dim, **kw)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_per_partition,
                                                 dtype=self.weight.dtype), requires_grad=False)
            set_weight_attrs(self.bias, {"weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        if embedding.weight.shape != self.weight.shape:
            raise ValueError("cannot tie an LM head to an embedding of another shape")
        self.weight = embedding.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] over the real vocabulary."""
        logits = F.linear(hidden, self.weight, self.bias)
        logits = tensor_model_parallel_all_gather(logits, dim=-1)
        return logits[..., :self.num_embeddings].float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is not an embedding lookup: call compute_logits")
