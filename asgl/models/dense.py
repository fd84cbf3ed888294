"""Dense decoder families that differ from Llama only in switches of `DecoderArch`
(llama.py): each class here derives its variant from the HF config and nothing else.

- Qwen 3: RMSNorm on each head of q and k before RoPE.
- Granite: multipliers on embeddings, attention scale, residual branches and logits.
- OLMo 2: norms after attention and MLP (none before), q/k RMSNorm over all heads.
- Gemma: RMSNorm scaled by 1 + w, GeGLU (tanh), embeddings times sqrt(hidden), tied head.
- Gemma 2: + norms before and after both blocks, attention and final logit soft-capping,
  query_pre_attn_scalar, sliding-window layers alternating with global ones (layer_types).
- Gemma 3 (text): Gemma 2's layout + per-head q/k norms, per-layer-type RoPE bases, 5:1
  sliding pattern (all from the config).
- Phi-3 / Phi-3.5: Llama with q/k/v and gate/up fused in the checkpoint (the fused
  parameters load whole) and LongRoPE.
- StableLM: LayerNorm with bias, partial rotary, optional q/k/v bias, optional parallel
  residual, optional per-head q/k LayerNorm (StableLM 2 12B).
- Command-R (Cohere): bias-free LayerNorm, parallel attention + MLP, GPT-J RoPE, logit
  scale, tied head, optional per-head q/k LayerNorm.
- Cohere 2 (Command R7B, Command A): + sliding-window layers with RoPE, global layers
  without position encoding (layer_types).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from asgl.models.llama import DecoderArch, LlamaForCausalLM


_PER_HEAD_NORM = re.compile(r"\.(q|k)_layernorm\.norms\.(\d+)\.weight$")


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(qkv_bias=bias, o_bias=bias, qk_norm="head")


class GraniteForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(qkv_bias=bias, o_bias=bias, scaling=config.attention_multiplier,
                           embed_scale=config.embedding_multiplier,
                           residual_scale=config.residual_multiplier,
                           logit_scale=1.0 / config.logits_scaling)


class Olmo2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(qkv_bias=bias, o_bias=bias, style="post", qk_norm="full")


class GemmaForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(qkv_bias=bias, o_bias=bias, norm="gemma",
                           embed_scale=config.hidden_size ** 0.5, embed_scale_in_dtype=True)


class Gemma2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(qkv_bias=bias, o_bias=bias, norm="gemma", style="sandwich",
                           scaling=config.query_pre_attn_scalar ** -0.5,
                           attn_logit_cap=getattr(config, "attn_logit_softcapping", None) or 0.0,
                           final_logit_cap=getattr(config, "final_logit_softcapping", None) or 0.0,
                           embed_scale=config.hidden_size ** 0.5, embed_scale_in_dtype=True,
                           act=config.hidden_activation)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        return dataclasses.replace(super().decoder_arch(config), qk_norm="head")


class Phi3ForCausalLM(LlamaForCausalLM):
    """The checkpoint's qkv_proj / gate_up_proj already have our fused layout; their
    loaders split them per rank (shard id None)."""


class StableLmForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        return DecoderArch(qkv_bias=bool(config.use_qkv_bias), o_bias=False, norm="layer",
                           norm_eps_attr="layer_norm_eps",
                           qk_norm="head_ln" if getattr(config, "qk_layernorm", False) else None,
                           style="parallel" if config.use_parallel_residual else "pre")

    def _map_weights(self, weights):
        # q_layernorm.norms.<head>.weight (a LayerNorm module per head) -> row <head> of
        # our [heads, head_dim] q_norm weight
        for source, name, tensor, shard_id in super()._map_weights(weights):
            match = _PER_HEAD_NORM.search(name)
            if match:
                name = name[:match.start()] + f".{match.group(1)}_norm.weight"
                shard_id = int(match.group(2))
            yield source, name, tensor, shard_id


class CohereForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(qkv_bias=bias, o_bias=bias, norm="layer_nobias",
                           norm_eps_attr="layer_norm_eps", style="parallel",
                           qk_norm="head_ln" if getattr(config, "use_qk_norm", False) else None,
                           logit_scale=config.logit_scale, rope_neox=False)


class Cohere2ForCausalLM(CohereForCausalLM):
    """Command R7B / Command A: Cohere's block with sliding-window layers (RoPE) and global
    layers without position encoding."""

    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        return dataclasses.replace(super().decoder_arch(config), rope_sliding_only=True)
