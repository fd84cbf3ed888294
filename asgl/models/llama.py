"""Llama family: Llama 2/3/3.1 (rope scaling), SmolLM2, Mistral (sliding window) and Qwen2
(bias on q/k/v). A pre-norm decoder with fused qkv and gate_up projections."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from asgl.engine.contracts.forward_batch import ForwardBatch
from asgl.layers.activation import get_act_and_mul
from asgl.layers.attention import Attention
from asgl.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from asgl.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from asgl.layers.norm import RMSNorm
from asgl.layers.quant import QuantizationConfig
from asgl.layers.rotary import RotaryEmbedding, get_rope
from asgl.models.weights import assign_weights

def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

def _sliding_window(config: Any, layer_id: int) -> Optional[int]:
    """Mistral windows every layer; Qwen2 only the layers `layer_types` marks sliding."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[layer_id] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", None) is False:
        return None
    return getattr(config, "sliding_window", None)

class LlamaMLP(nn.Module):
    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig], prefix: str):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(h, [i, i], bias, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(i, h, bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = get_act_and_mul(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))

class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary_emb: RotaryEmbedding, qkv_bias: bool,
                 o_bias: bool, quant_config: Optional[QuantizationConfig], prefix: str):
        super().__init__()
        head_dim = _head_dim(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, qkv_bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        o_bias, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.rotary_emb = rotary_emb  # one module shared by every layer
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, head_dim ** -0.5,
                              self.qkv_proj.num_kv_heads, layer_id,
                              sliding_window=_sliding_window(config, layer_id))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, batch))

class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary_emb: RotaryEmbedding, qkv_bias: bool,
                 o_bias: bool, quant_config: Optional[QuantizationConfig], prefix: str):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, rotary_emb, qkv_bias, o_bias,
                                        quant_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor],
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried separately so each norm can fuse the add before it.
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

class LlamaModel(nn.Module):
    """The decoder stack without the LM head: returns final hidden states (what embedding
    models pool)."""

    def __init__(self, config: Any, qkv_bias: bool, o_bias: bool,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "model"):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        rotary_emb = get_rope(config, _head_dim(config))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb, qkv_bias, o_bias, quant_config,
                              f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, batch)
        return self.norm(x, residual)[0]

class LlamaForCausalLM(nn.Module):
    # HF checkpoint names that our fused parameters gather: (fused, piece, shard id).
    stacked_params = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"),
                      ("qkv_proj", "v_proj", "v"), ("gate_up_proj", "gate_proj", 0),
                      ("gate_up_proj", "up_proj", 1)]

    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None):
        super().__init__()
        self.config = config
        qkv_bias, o_bias = self._attention_bias(config)
        self.model = LlamaModel(config, qkv_bias, o_bias, quant_config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = self.model.layers[0].self_attn.qkv_proj.num_kv_heads  # this rank's
        self.head_dim = _head_dim(config)

    @staticmethod
    def _attention_bias(config: Any) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o_proj)."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids, positions, batch, input_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; every parameter must be filled exactly by the checkpoint."""
        assign_weights(self, self._map_weights(weights))

    def _map_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        for name, tensor in weights:
            if "rotary_emb." in name:  # inv_freq / cos-sin buffers some checkpoints carry
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            source, shard_id = name, None
            for fused, piece, shard in self.stacked_params:
                if f".{piece}." in name:
                    name, shard_id = name.replace(f".{piece}.", f".{fused}."), shard
                    break
            yield source, name, tensor, shard_id


class MistralForCausalLM(LlamaForCausalLM):
    pass

class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def _attention_bias(config: Any) -> tuple[bool, bool]:
        return True, False  # Qwen2 has bias on q/k/v only

