"""InternLM 2 / 2.5 (`InternLM2ForCausalLM`): the Llama decoder under other names, with q, k
and v packed into one `wqkv` tensor in a grouped layout.

The published modelling file (internlm/internlm2-7b, modeling_internlm2.py) splits the
projection as `rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + groups)`: for each KV
head, its `groups` query heads, then its key head, then its value head. We unpack that
into the q / k / v pieces of our fused projection. `bias` in the config puts biases on
`wqkv` and `wo`.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from asgl.models.remote_layout import RemoteLayoutLM, set_default


class InternLM2ForCausalLM(RemoteLayoutLM):
    renames = [
        (r"^model\.tok_embeddings\.", "model.embed_tokens."),
        (r"^output\.", "lm_head."),
        (r"\.attention\.wqkv\.", ".self_attn.qkv_proj."),
        (r"\.attention\.wo\.", ".self_attn.o_proj."),
        (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
        (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
        (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
        (r"\.attention_norm\.", ".input_layernorm."),
        (r"\.ffn_norm\.", ".post_attention_layernorm."),
    ]

    @classmethod
    def normalize_config(cls, config: Any) -> Any:
        super().normalize_config(config)
        set_default(config, "attention_bias", bool(getattr(config, "bias", False)))
        return config

    def _split(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor, Any]]:
        if ".qkv_proj." not in name:
            return super()._split(name, tensor)
        c = self.config
        kv, d = c.num_key_value_heads, self.head_dim
        groups = c.num_attention_heads // kv
        grouped = tensor.reshape(kv, groups + 2, d, *tensor.shape[1:])
        rest = tensor.shape[1:]
        return [(name, grouped[:, :groups].reshape(kv * groups * d, *rest), "q"),
                (name, grouped[:, groups].reshape(kv * d, *rest), "k"),
                (name, grouped[:, groups + 1].reshape(kv * d, *rest), "v")]
