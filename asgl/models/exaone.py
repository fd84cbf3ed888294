"""Exaone 3 / 3.5 (`ExaoneForCausalLM`): LG AI Research's published layout of a Llama
decoder (transformers reads it as Llama through its own name mapping; its ExaoneConfig
maps `num_layers`, `layer_norm_epsilon` and `activation_function` to Llama's names)."""

from __future__ import annotations

from asgl.models.remote_layout import RemoteLayoutLM


class ExaoneForCausalLM(RemoteLayoutLM):
    renames = [
        (r"^transformer\.wte\.", "model.embed_tokens."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"^transformer\.h\.", "model.layers."),
        (r"\.ln_1\.", ".input_layernorm."),
        (r"\.ln_2\.", ".post_attention_layernorm."),
        (r"\.attn\.attention\.out_proj\.", ".self_attn.o_proj."),
        (r"\.attn\.attention\.", ".self_attn."),
        (r"\.mlp\.c_fc_0\.", ".mlp.gate_proj."),
        (r"\.mlp\.c_fc_1\.", ".mlp.up_proj."),
        (r"\.mlp\.c_proj\.", ".mlp.down_proj."),
    ]
