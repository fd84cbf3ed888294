"""DeepSeek V1 MoE (deepseek-moe-16b, `DeepseekForCausalLM`, `model_type` "deepseek"): the
Llama decoder with DeepSeekMoE blocks, no MLA (DeepSeek V2/V3 are another module).

- Layer i is sparse when the config has routed experts, i >= `first_k_dense_replace` and
  i % `moe_layer_freq` == 0; the others are dense Llama MLPs of `intermediate_size`.
- A sparse block: softmax router (`mlp.gate`, no bias), top-`num_experts_per_tok` of
  `n_routed_experts` experts of `moe_intermediate_size`, renormalized only with
  `norm_topk_prob` (false in the published checkpoints), plus `n_shared_experts` shared
  experts fused in one MLP of `moe_intermediate_size * n_shared_experts`
  (`mlp.shared_experts.*`), added without a gate.
- Llama attention (bias per `attention_bias`), RoPE per `rope_theta` / `rope_scaling`.
"""

from __future__ import annotations

from typing import Any, Optional

from asgl.layers.moe import RouterConfig
from asgl.layers.quant import QuantizationConfig
from asgl.models.moe import SparseMoeBlock, _MoEForCausalLM, num_experts


class DeepseekForCausalLM(_MoEForCausalLM):
    @staticmethod
    def is_sparse_layer(config: Any, layer_id: int) -> bool:
        return (getattr(config, "n_routed_experts", None) is not None
                and layer_id >= (getattr(config, "first_k_dense_replace", 0) or 0)
                and layer_id % (getattr(config, "moe_layer_freq", 1) or 1) == 0)

    @classmethod
    def moe_block(cls, config: Any, quant_config: Optional[QuantizationConfig],
                  prefix: str) -> SparseMoeBlock:
        scoring = getattr(config, "scoring_func", "softmax")
        if scoring != "softmax":
            raise ValueError(f"DeepSeek V1 router scoring {scoring!r} is not supported")
        renorm = bool(getattr(config, "norm_topk_prob", False))
        shared = config.moe_intermediate_size * (getattr(config, "n_shared_experts", 0) or 0)
        return SparseMoeBlock(config, num_experts(config), config.moe_intermediate_size,
                              RouterConfig(top_k=config.num_experts_per_tok, renormalize=renorm),
                              quant_config, prefix, shared_intermediate=shared)

    def _map_weights(self, weights):
        for source, tensor in weights:
            name = source.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
            for _, param, t, shard in super()._map_weights([(name, tensor)]):
                yield source, param, t, shard
