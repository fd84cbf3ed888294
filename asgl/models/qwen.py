"""Qwen (1) (`QWenLMHeadModel`; Qwen-1.8B/7B/14B/72B and their chat models), after the
published modelling file (Qwen/Qwen-7B, modeling_qwen.py).

What differs from Llama: names under `transformer.` (`wte`, `h.N.ln_1`, `attn.c_attn`,
`attn.c_proj`, `ln_2`, `mlp.w1/w2/c_proj`, `ln_f`); q/k/v packed into `c_attn` ([q | k | v],
always with bias); the MLP is `c_proj(w1(x) * silu(w2(x)))`, so `w2` is the gate and `w1`
the up projection, and the config's `intermediate_size` is twice their width; `no_bias`
drops the other biases; rotary over `rotary_pct` of each head, base `rotary_emb_base`.
The context is `seq_length`: the file's dynamic-NTK and log-n query scaling act only on
positions past it, which we do not serve.
"""

from __future__ import annotations

from typing import Any

from asgl.models.llama import DecoderArch
from asgl.models.remote_layout import RemoteLayoutLM, set_default


class QWenLMHeadModel(RemoteLayoutLM):
    renames = [
        (r"^transformer\.wte\.", "model.embed_tokens."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"^transformer\.h\.", "model.layers."),
        (r"\.ln_1\.", ".input_layernorm."),
        (r"\.ln_2\.", ".post_attention_layernorm."),
        (r"\.attn\.c_attn\.", ".self_attn.qkv_proj."),
        (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
        (r"\.mlp\.w2\.", ".mlp.gate_proj."),
        (r"\.mlp\.w1\.", ".mlp.up_proj."),
        (r"\.mlp\.c_proj\.", ".mlp.down_proj."),
    ]

    @classmethod
    def normalize_config(cls, config: Any) -> Any:
        if getattr(config, "_asgl_qwen_ffn", None) is None:  # halve once (idempotent)
            config.intermediate_size = config.intermediate_size // 2
            config._asgl_qwen_ffn = True
        set_default(config, "head_dim", getattr(config, "kv_channels", None)
                    or config.hidden_size // config.num_attention_heads)
        set_default(config, "rms_norm_eps", getattr(config, "layer_norm_epsilon", 1e-6))
        config.max_position_embeddings = getattr(config, "seq_length", None) or \
            getattr(config, "max_position_embeddings", 8192)
        set_default(config, "rope_theta", float(getattr(config, "rotary_emb_base", 10000)))
        set_default(config, "partial_rotary_factor", float(getattr(config, "rotary_pct", 1.0)))
        set_default(config, "mlp_bias", not getattr(config, "no_bias", True))
        return super().normalize_config(config)

    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        return DecoderArch(qkv_bias=True, o_bias=not getattr(config, "no_bias", True),
                           norm_eps_attr="rms_norm_eps")

    def _split(self, name, tensor):
        if ".qkv_proj." in name:
            return [(name, tensor, None)]  # [q | k | v]: our fused layout
        return super()._split(name, tensor)
