"""ChatGLM 2 / 3 and GLM-4 (`ChatGLMModel`, `ChatGLMForConditionalGeneration`): the GLM
block of THUDM's published modelling file (THUDM/chatglm3-6b, modeling_chatglm.py).

What differs from Llama: rotary embedding on the first half of each head only, pairs
interleaved (GPT-J style), base 10000 x `rope_ratio` (GLM-4, the 32k/128k models);
multi-query attention with `multi_query_group_num` KV heads; q/k/v packed into
`query_key_value` ([q | k | v], with bias: `add_qkv_bias`); gate and up packed into
`dense_h_to_4h` ([gate | up], our fused layout); everything under `transformer.`.
The softmax scale is 1/sqrt(head_dim) (`apply_query_key_layer_scaling` divides and
multiplies by the same layer number). Without `multi_query_attention` the packed tensor is
per head ([heads, 3, head_dim]): unpacked into q, k, v here.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from asgl.models.llama import DecoderArch
from asgl.models.remote_layout import RemoteLayoutLM, set_default


class ChatGLMForCausalLM(RemoteLayoutLM):
    renames = [
        (r"^transformer\.embedding\.word_embeddings\.", "model.embed_tokens."),
        (r"^transformer\.output_layer\.", "lm_head."),
        (r"^transformer\.encoder\.final_layernorm\.", "model.norm."),
        (r"^transformer\.encoder\.layers\.", "model.layers."),
        (r"\.self_attention\.query_key_value\.", ".self_attn.qkv_proj."),
        (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
        (r"\.mlp\.dense_h_to_4h\.", ".mlp.gate_up_proj."),
        (r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj."),
    ]

    @classmethod
    def normalize_config(cls, config: Any) -> Any:
        if not getattr(config, "post_layer_norm", True) or \
                getattr(config, "apply_residual_connection_post_layernorm", False):
            raise NotImplementedError("ChatGLM without post_layer_norm, or with "
                                      "apply_residual_connection_post_layernorm")
        heads = config.num_attention_heads
        set_default(config, "num_hidden_layers", config.num_layers)
        set_default(config, "vocab_size", config.padded_vocab_size)
        set_default(config, "intermediate_size", config.ffn_hidden_size)
        set_default(config, "head_dim", getattr(config, "kv_channels", None)
                    or config.hidden_size // heads)
        mqa = getattr(config, "multi_query_attention", False)
        set_default(config, "num_key_value_heads",
                    config.multi_query_group_num if mqa else heads)
        set_default(config, "rms_norm_eps", getattr(config, "layernorm_epsilon", 1e-5))
        set_default(config, "max_position_embeddings", getattr(config, "seq_length", 2048))
        set_default(config, "rope_theta", 10000.0 * float(getattr(config, "rope_ratio", 1.0)))
        set_default(config, "partial_rotary_factor", 0.5)
        set_default(config, "mlp_bias", bool(getattr(config, "add_bias_linear", False)))
        return super().normalize_config(config)

    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        qkv_bias = bool(getattr(config, "add_bias_linear", False)
                        or getattr(config, "add_qkv_bias", False))
        return DecoderArch(qkv_bias=qkv_bias, o_bias=bool(getattr(config, "add_bias_linear",
                                                                  False)),
                           norm="rms" if getattr(config, "rmsnorm", True) else "layer",
                           rope_neox=False)

    def _split(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor, Any]]:
        if ".qkv_proj." in name and not getattr(self.config, "multi_query_attention", False):
            heads, d = self.config.num_attention_heads, self.head_dim
            per_head = tensor.reshape(heads, 3, d, *tensor.shape[1:])
            return [(name, per_head[:, i].reshape(heads * d, *tensor.shape[1:]), shard)
                    for i, shard in enumerate("qkv")]
        return [(name, tensor, None)]  # [q | k | v] and [gate | up]: our fused layouts
