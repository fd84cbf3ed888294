"""XVERSE-MoE (XVERSE-MoE-A4.2B / A36B, `XverseMoeForCausalLM`, `model_type` "xverse"): the
Llama decoder with a sparse MoE block on every layer.

- Router `mlp.router` (no bias), softmax, top-`moe_top_k` of `num_experts` experts of
  `intermediate_size` (fine-grained: a quarter of the dense FFN), renormalized only with
  `norm_topk_prob` (absent from the published configs: off);
- plus `num_shared_experts` shared experts fused in one MLP of
  `intermediate_size * num_shared_experts` (`mlp.shared_experts.*`), added without a gate;
- Llama attention without biases, RoPE per `rope_theta`.
"""

from __future__ import annotations

from typing import Any, Optional

from asgl.layers.moe import RouterConfig
from asgl.layers.quant import QuantizationConfig
from asgl.models.moe import SparseMoeBlock, _MoEForCausalLM, num_experts


class XverseMoeForCausalLM(_MoEForCausalLM):
    @staticmethod
    def is_sparse_layer(config: Any, layer_id: int) -> bool:
        return getattr(config, "num_experts", None) is not None

    @classmethod
    def moe_block(cls, config: Any, quant_config: Optional[QuantizationConfig],
                  prefix: str) -> SparseMoeBlock:
        renorm = bool(getattr(config, "norm_topk_prob", False))
        shared = config.intermediate_size * (getattr(config, "num_shared_experts", 0) or 0)
        return SparseMoeBlock(config, num_experts(config), config.intermediate_size,
                              RouterConfig(top_k=config.moe_top_k, renormalize=renorm),
                              quant_config, prefix, shared_intermediate=shared)

    def _map_weights(self, weights):
        for source, tensor in weights:
            name = source.replace(".mlp.router.", ".mlp.gate.")
            name = name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
            for _, param, t, shard in super()._map_weights([(name, tensor)]):
                yield source, param, t, shard
