"""Log-probabilities of chosen tokens and their top alternatives.

Always taken from the raw logits (before temperature, penalties and bias), like vLLM's
default: they describe the model, not the sampling recipe.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Logprobs(NamedTuple):
    token_logprobs: torch.Tensor  # [N] float32: logprob of each row's target token
    top_ids: Optional[torch.Tensor]  # [N, K] int64, by logprob descending; None when K == 0
    top_values: Optional[torch.Tensor]  # [N, K] float32


def gather_logprobs(logprobs: torch.Tensor, ids: torch.Tensor, top_k: int) -> Logprobs:
    """From normalized `logprobs` [N, V]: the entries at `ids` [N] and the `top_k` largest."""
    chosen = logprobs.gather(1, ids.view(-1, 1)).view(-1)
    if top_k <= 0:
        return Logprobs(chosen, None, None)
    values, top_ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)  # sorted
    return Logprobs(chosen, top_ids, values)


def compute_prompt_logprobs(logits: torch.Tensor, next_ids: torch.Tensor,
                            top_k: int = 0) -> Logprobs:
    """Prompt-token logprobs: row i of `logits` [N, V] scored against `next_ids[i]`."""
    return gather_logprobs(torch.log_softmax(logits.float(), dim=-1), next_ids, top_k)
