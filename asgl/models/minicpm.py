"""MiniCPM 1 / 2 (`MiniCPMForCausalLM`), after the published modelling file
(openbmb/MiniCPM-2B-sft-bf16, modeling_minicpm.py): Llama's names and blocks with muP
scales: embeddings times `scale_emb`, each attention / MLP output times
`scale_depth / sqrt(num_hidden_layers)` before the residual add, and the LM head reads
`hidden / (hidden_size / dim_model_base)` (a logit scale, since the head is linear).
"""

from __future__ import annotations

import math
from typing import Any

from asgl.models.llama import DecoderArch
from asgl.models.remote_layout import RemoteLayoutLM, set_default


class MiniCPMForCausalLM(RemoteLayoutLM):
    @classmethod
    def normalize_config(cls, config: Any) -> Any:
        # the published MiniCPMConfig's defaults (a config.json may leave them out)
        set_default(config, "tie_word_embeddings", True)
        for name in ("scale_emb", "dim_model_base", "scale_depth"):
            set_default(config, name, 1)
        return super().normalize_config(config)

    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(qkv_bias=bias, o_bias=bias,
                           embed_scale=float(getattr(config, "scale_emb", 1.0)),
                           residual_scale=float(config.scale_depth)
                           / math.sqrt(config.num_hidden_layers),
                           logit_scale=float(config.dim_model_base) / config.hidden_size)
