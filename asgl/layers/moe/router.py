"""Expert selection: router logits -> (top-k weights, top-k expert ids) per token.

Covers the routers of the MoE families we serve:

- Mixtral, Qwen3-MoE, Qwen2-MoE (`norm_topk_prob`): softmax, top-k, renormalized (Qwen2 per
  config); OLMoE, Qwen1.5-MoE: softmax, top-k, not renormalized;
- DBRX: softmax, top-k, divided by their p-norm (`moe_normalize_expert_weights`);
- DeepSeek V2 (`group_limited_greedy`): softmax, the best groups by their max, top-k, times
  `routed_scaling_factor`;
- DeepSeek V3 (`noaux_tc`): sigmoid, scores + `e_score_correction_bias` for the choice only,
  the best groups by the sum of their top 2, top-k, renormalized, times the scaling factor.

Everything is computed in float32 whatever the logits' dtype; the weights come back in
float32, the ids as int32. No host synchronization: it is a handful of torch ops that
CUDA graphs capture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class RouterConfig:
    """How a family turns router logits into expert weights.

    - `scoring`: "softmax" over all experts, or "sigmoid" per expert (DeepSeek V3).
    - `renormalize`: divide the chosen weights by their sum (their p-norm when `norm_p`
      is not 1: DBRX's `moe_normalize_expert_weights`), so they add up to 1.
    - `num_expert_group` / `topk_group`: grouped top-k (DeepSeek V2/V3): the experts are
      split into `num_expert_group` equal groups, each group is scored (`group_score`:
      "max" of its scores as V2, or "top2_sum" as V3), only the best `topk_group` groups
      stay eligible, and the top-k is taken among their experts.
    - `routed_scaling_factor`: multiplies the final weights (after any renormalization).
      DeepSeek V2's original code scales only when it does not renormalize: pass 1.0
      when renormalizing to reproduce it.
    - `use_correction_bias`: the choice (not the weights) uses scores + a per-expert bias
      (`e_score_correction_bias` of DeepSeek V3), passed to `select_experts`.
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    norm_p: float = 1.0
    num_expert_group: Optional[int] = None
    topk_group: Optional[int] = None
    group_score: str = "max"
    routed_scaling_factor: float = 1.0
    use_correction_bias: bool = False

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"router scoring must be softmax or sigmoid, not {self.scoring!r}")
        if self.group_score not in ("max", "top2_sum"):
            raise ValueError(f"group_score must be max or top2_sum, not {self.group_score!r}")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError("grouped top-k needs both num_expert_group and topk_group")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def select_experts(router_logits: torch.Tensor, config: RouterConfig,
                   correction_bias: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, top_k] float32, ids [T, top_k] int32).

    `correction_bias` [E] (float32) is required when `config.use_correction_bias`."""
    logits = router_logits.float()
    T, E = logits.shape
    if config.top_k > E:
        raise ValueError(f"top_k {config.top_k} exceeds the number of experts {E}")
    scores = logits.softmax(dim=-1) if config.scoring == "softmax" else logits.sigmoid()
    choice = scores
    if config.use_correction_bias:
        if correction_bias is None:
            raise ValueError("this router needs the experts' correction bias")
        choice = scores + correction_bias.float()
    if config.num_expert_group is not None:
        choice = _mask_groups(choice, config)
    _, ids = torch.topk(choice, config.top_k, dim=-1)
    weights = scores.gather(1, ids)
    if config.renormalize:
        if config.norm_p == 1.0:
            # +1e-20 as DeepSeek V3 does: sigmoid scores may all be tiny; no effect otherwise
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights / weights.norm(p=config.norm_p, dim=-1, keepdim=True)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return weights, ids.to(torch.int32)


def _mask_groups(choice: torch.Tensor, config: RouterConfig) -> torch.Tensor:
    """Scores of experts outside the best `topk_group` groups set to -inf."""
    T, E = choice.shape
    groups = config.num_expert_group
    if E % groups:
        raise ValueError(f"{E} experts do not split into {groups} groups")
    grouped = choice.view(T, groups, E // groups)
    if config.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = torch.topk(group_scores, config.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, E)
