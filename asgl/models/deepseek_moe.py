"""DeepSeek's MoE block (V2, V2-Lite, V3/R1): routed experts (asgl's FusedMoE) plus
always-on shared experts, summed and all-reduced once.

Routing, per the published modelling files (deepseek-ai/DeepSeek-V2 and DeepSeek-V3,
modeling_deepseek.py) and transformers 5's ports:

- V2 / V2-Lite (`topk_method` greedy or group_limited_greedy): softmax over the experts,
  top-k (among the best `topk_group` of `n_group` groups, a group scored by its best
  expert); the weights are renormalized when `norm_topk_prob` (and top_k > 1), else
  multiplied by `routed_scaling_factor` (every published V2 config: not renormalized).
- V3 (`noaux_tc`): sigmoid scores; the choice uses scores + e_score_correction_bias, groups
  scored by the sum of their two best; the chosen (bias-free) scores are renormalized
  per `norm_topk_prob`, then multiplied by `routed_scaling_factor`.

The router's weight is float32 and the logits are computed in float32 (HF keeps
`gate.weight` in float32).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from asgl.distributed import tensor_model_parallel_all_reduce
from asgl.layers.moe import FusedMoE, MoEGate, RouterConfig, map_expert_weight
from asgl.layers.quant import QuantizationConfig
from asgl.models.moe import SharedExpertMLP


def deepseek_router(config: Any) -> RouterConfig:
    top_k = config.num_experts_per_tok
    groups = getattr(config, "n_group", None)
    method = getattr(config, "topk_method", None)
    grouped = dict(num_expert_group=groups, topk_group=config.topk_group) if (
        groups and groups > 1 and method != "greedy") else {}
    if method == "noaux_tc" or getattr(config, "model_type", "") == "deepseek_v3":
        return RouterConfig(top_k=top_k, scoring="sigmoid",
                            renormalize=bool(getattr(config, "norm_topk_prob", True)),
                            group_score="top2_sum", use_correction_bias=True,
                            routed_scaling_factor=float(config.routed_scaling_factor),
                            **grouped)
    renorm = bool(getattr(config, "norm_topk_prob", False)) and top_k > 1
    scale = 1.0 if renorm else float(config.routed_scaling_factor)
    return RouterConfig(top_k=top_k, renormalize=renorm, group_score="max",
                        routed_scaling_factor=scale, **grouped)


class DeepseekMoE(nn.Module):
    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig], prefix: str):
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"DeepSeek MoE with activation {config.hidden_act!r} is not supported")
        h, n_experts = config.hidden_size, config.n_routed_experts
        router = deepseek_router(config)
        self.gate = MoEGate(h, n_experts, float32=True,
                            correction_bias=router.use_correction_bias)
        for p in (self.gate.weight, self.gate.e_score_correction_bias):
            if p is not None:  # stays float32 when the model is cast (models/weights.py)
                p.keep_float32 = True
        self.experts = FusedMoE(n_experts, h, config.moe_intermediate_size, router,
                                reduce_results=False, prefix=f"{prefix}.experts")
        shared = (getattr(config, "n_shared_experts", None) or 0) * config.moe_intermediate_size
        self.shared_experts = (SharedExpertMLP(h, shared, config.hidden_act, quant_config,
                                               f"{prefix}.shared_experts") if shared else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(x.float(), self.gate.weight.float())
        out = self.experts(x, logits, self.gate.e_score_correction_bias)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return tensor_model_parallel_all_reduce(out)

    @staticmethod
    def map_weight(name: str, tensor: torch.Tensor):
        """A checkpoint tensor of the routed experts -> (source, parameter, tensor, shard
        id); None for the rest (gate, shared experts: the model's generic mapping)."""
        mapped = map_expert_weight(name)
        return None if mapped is None else (name, mapped[0], tensor, mapped[1])
