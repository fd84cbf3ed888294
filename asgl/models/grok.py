"""Grok-1 (xAI, 314B MoE) in the layout of the HF port (hpcai-tech/grok-1,
`Grok1ModelForCausalLM`, `model_type` "grok-1").

The Llama decoder (llama.py) in its "sandwich" style with a sparse MoE block on every layer:

- RMSNorm (weight `scale`, applied as is) before and after attention and before and after
  the MoE block: `pre_attn_norm`, `post_attn_norm`, `pre_moe_norm`, `post_moe_norm`;
- attention scores times `attn_output_multiplier` (not head_dim ** -0.5), then soft-capped
  to `max_attn_value` * tanh(s / `max_attn_value`) (30 in the published config);
- embeddings times `embedding_multiplier_scale`, logits times `output_multiplier_scale`,
  the LM head tied to the embeddings;
- 8 experts, softmax top-2 not renormalized (xAI's JAX `model.py` and the HF port alike),
  each `linear_1(gelu(linear(x)) * linear_v(x))`. GELU is exact here as in the HF port
  (`nn.GELU()`); xAI's JAX code uses `jax.nn.gelu`, whose default is the tanh form: a
  config `hidden_act` ("gelu_pytorch_tanh") picks that instead.
- RoPE (NeoX halves) with base 10000 unless the config names `rope_theta`.

`Grok1ForCausalLM` (SGLang's name) maps to the same class; only the HF port's tensor names
are read (`model.layers.<i>.attn.*`, `moe_block.gate`, `moe_block.experts.<e>.linear*`).
"""

from __future__ import annotations

from typing import Any, Optional

from asgl.layers.moe import RouterConfig
from asgl.layers.quant import QuantizationConfig
from asgl.models.llama import DecoderArch
from asgl.models.moe import SparseMoeBlock, _MoEForCausalLM, num_experts

# the HF port's names -> the Llama decoder's
_GROK_NAMES = [(".attn.", ".self_attn."), (".pre_attn_norm.", ".input_layernorm."),
               (".post_attn_norm.", ".post_attention_layernorm."),
               (".pre_moe_norm.", ".pre_feedforward_layernorm."),
               (".post_moe_norm.", ".post_feedforward_layernorm.")]


class Grok1ModelForCausalLM(_MoEForCausalLM):
    expert_names = ("linear", "linear_v", "linear_1")  # gate (GELU), up, down
    block_name = "moe_block"

    @classmethod
    def moe_arch(cls, config: Any) -> DecoderArch:
        return DecoderArch(style="sandwich", scaling=float(config.attn_output_multiplier),
                           attn_logit_cap=float(getattr(config, "max_attn_value", 30.0)),
                           embed_scale=float(config.embedding_multiplier_scale),
                           logit_scale=float(config.output_multiplier_scale))

    @classmethod
    def moe_block(cls, config: Any, quant_config: Optional[QuantizationConfig],
                  prefix: str) -> SparseMoeBlock:
        act = getattr(config, "hidden_act", None) or "gelu"
        act = "gelu_tanh" if act in ("gelu_pytorch_tanh", "gelu_new") else act
        return SparseMoeBlock(config, num_experts(config), config.intermediate_size,
                              RouterConfig(top_k=config.num_experts_per_tok, renormalize=False),
                              quant_config, prefix, activation=act)

    def _map_weights(self, weights):
        for source, tensor in weights:
            name = source
            for theirs, ours in _GROK_NAMES:
                name = name.replace(theirs, ours)
            if name.endswith("norm.scale"):  # the HF port's RMSNorm weight
                name = name[:-len("scale")] + "weight"
            for _, param, t, shard in super()._map_weights([(name, tensor)]):
                yield source, param, t, shard


class Grok1ForCausalLM(Grok1ModelForCausalLM):
    pass
