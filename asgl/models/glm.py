"""GLM-4 in transformers' own layouts: `GlmForCausalLM` (glm-4-9b-chat-hf: the GLM block of
chatglm.py under Llama-style names, with [gate | up] fused in the checkpoint) and
`Glm4ForCausalLM` (GLM-4-0414: + a norm after attention and one after the MLP).

Both rotate the first `partial_rotary_factor` (0.5) of each head with interleaved pairs.
GLM-4-0414's block is our "sandwich" layout; its names map onto it:
post_self_attn_layernorm -> post_attention_layernorm (after attention),
post_attention_layernorm -> pre_feedforward_layernorm (before the MLP),
post_mlp_layernorm -> post_feedforward_layernorm (after the MLP).
"""

from __future__ import annotations

from typing import Any

from asgl.models.llama import DecoderArch
from asgl.models.remote_layout import RemoteLayoutLM


class GlmForCausalLM(RemoteLayoutLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        return DecoderArch(qkv_bias=bool(getattr(config, "attention_bias", True)),
                           o_bias=False, rope_neox=False)


class Glm4ForCausalLM(GlmForCausalLM):
    renames = [
        (r"\.post_attention_layernorm\.", ".pre_feedforward_layernorm."),
        (r"\.post_self_attn_layernorm\.", ".post_attention_layernorm."),
        (r"\.post_mlp_layernorm\.", ".post_feedforward_layernorm."),
    ]

    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        return DecoderArch(qkv_bias=bool(getattr(config, "attention_bias", True)),
                           o_bias=False, rope_neox=False, style="sandwich")
