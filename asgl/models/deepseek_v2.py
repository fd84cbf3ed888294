"""DeepSeek V2 / V2-Lite / V3 and MiniCPM 3: decoders with multi-head latent attention (MLA).

Attention (DeepseekV2Attention): queries through a low-rank pair q_a_proj -> RMSNorm ->
q_b_proj (or one q_proj when q_lora_rank is None: V2-Lite); keys and values from one
latent per token, kv_a_proj_with_mqa -> [c (kv_lora_rank) | k_pe (rope dims)], c normed
by kv_a_layernorm; kv_b_proj expands c to each head's no-position key and value. Only
[c | rotated k_pe] is cached (LatentKVPool); asgl/layers/mla.py does the attention.

RoPE acts on the rope dims only: DeepSeek's weights pair dims interleaved (GPT-J style;
V3's `rope_interleave: false` and MiniCPM 3 pair the halves, NeoX style). YaRN's
mscale_all_dim also scales the softmax (scale = qk_head_dim^-0.5 * mscale^2).

MLP: dense (gate/up/down) for the first `first_k_dense_replace` layers and every layer of
MiniCPM 3; DeepSeek's other layers are MoE layers (routed experts + shared experts,
deepseek_moe.py).

MiniCPM 3 adds muP-style scalings: embeddings times scale_emb, each residual branch times
scale_depth / sqrt(layers), and hidden states divided by hidden_size / dim_model_base
before the (tied) LM head.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import nn

from asgl.distributed import get_tp_size
from asgl.engine.contracts.forward_batch import ForwardBatch
from asgl.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from asgl.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from asgl.layers.mla import LatentAttention
from asgl.layers.norm import RMSNorm
from asgl.layers.quant import QuantizationConfig
from asgl.layers.rotary import RotaryEmbedding, get_rope, rope_parameters
from asgl.layers.utils import divide
from asgl.models.llama import LlamaMLP, run_decoder_stack
from asgl.models.weights import assign_weights

# HF's MLA norms (q_a_layernorm, kv_a_layernorm) keep RMSNorm's default eps, not rms_norm_eps
_LATENT_NORM_EPS = 1e-6


def _yarn_mscale(scale: float, m: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def mla_softmax_scale(config: Any) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params.get("rope_type", params.get("type", "default")) != "default":
        m_all = params.get("mscale_all_dim", 0)
        if m_all:
            scale *= _yarn_mscale(params["factor"], m_all) ** 2
    return scale


class DeepseekV2Attention(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary_emb: RotaryEmbedding,
                 quant_config: Optional[QuantizationConfig], prefix: str):
        super().__init__()
        h, total_heads = config.hidden_size, config.num_attention_heads
        self.num_heads = divide(total_heads, get_tp_size(), "attention heads")
        self.nope, self.rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = config.v_head_dim, config.kv_lora_rank
        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        bias = bool(getattr(config, "attention_bias", False))
        qk = self.nope + self.rope
        q_kw = dict(quant_config=quant_config)
        if self.q_lora_rank is not None:
            self.q_a_proj = ReplicatedLinear(h, self.q_lora_rank, bias, prefix=f"{prefix}.q_a_proj",
                                             **q_kw)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, total_heads * qk, False,
                                                 prefix=f"{prefix}.q_b_proj", **q_kw)
        else:
            self.q_proj = ColumnParallelLinear(h, total_heads * qk, False,
                                               prefix=f"{prefix}.q_proj", **q_kw)
        self.kv_a_proj_with_mqa = ReplicatedLinear(h, self.kv_lora_rank + self.rope, bias,
                                                   prefix=f"{prefix}.kv_a_proj_with_mqa", **q_kw)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, _LATENT_NORM_EPS)
        # Unquantized: the attention reads its weight directly (absorbed into q and o).
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank,
                                              total_heads * (self.nope + self.v_dim), False,
                                              prefix=f"{prefix}.kv_b_proj")
        self.o_proj = RowParallelLinear(total_heads * self.v_dim, h, bias,
                                        prefix=f"{prefix}.o_proj", **q_kw)
        self.rotary_emb = rotary_emb
        self.attn = LatentAttention(self.num_heads, self.nope, self.rope, self.v_dim,
                                    self.kv_lora_rank, mla_softmax_scale(config), layer_id)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        T, H = x.shape[0], self.num_heads
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(T, H, self.nope + self.rope)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        c = self.kv_a_layernorm(c.contiguous())
        # contiguous copies: the fused rotary kernel rotates in place
        q_pe, k_pe = self.rotary_emb(positions, q[..., self.nope:].reshape(T, H * self.rope),
                                     k_pe.contiguous())
        q = torch.cat([q[..., :self.nope], q_pe.view(T, H, self.rope)], dim=-1)
        latent = torch.cat([c, k_pe.view(T, self.rope)], dim=-1)
        return self.o_proj(self.attn(q, latent, self.kv_b_proj.weight, batch))


def _is_moe_layer(config: Any, layer_id: int) -> bool:
    """The published rule (DeepSeek's modeling_deepseek.py): routed experts from layer
    first_k_dense_replace on, every moe_layer_freq-th layer."""
    n_experts = getattr(config, "n_routed_experts", None)
    return (bool(n_experts) and layer_id >= getattr(config, "first_k_dense_replace", 0)
            and layer_id % getattr(config, "moe_layer_freq", 1) == 0)


def _make_mlp(config: Any, layer_id: int, quant_config: Optional[QuantizationConfig],
              prefix: str) -> nn.Module:
    if _is_moe_layer(config, layer_id):
        from asgl.models.deepseek_moe import DeepseekMoE
        return DeepseekMoE(config, quant_config, prefix)
    return LlamaMLP(config, quant_config, prefix)


class DeepseekV2DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary_emb: RotaryEmbedding,
                 quant_config: Optional[QuantizationConfig], prefix: str,
                 residual_scale: float = 1.0):
        super().__init__()
        self.residual_scale = residual_scale
        self.self_attn = DeepseekV2Attention(config, layer_id, rotary_emb, quant_config,
                                             f"{prefix}.self_attn")
        self.mlp = _make_mlp(config, layer_id, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor],
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it is added), as in llama.py."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch)
        if self.residual_scale != 1.0:
            x = x * self.residual_scale
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        if self.residual_scale != 1.0:
            x = x * self.residual_scale
        return x, residual


class DeepseekV2Model(nn.Module):
    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None,
                 rope_neox: bool = False, embed_scale: float = 1.0, residual_scale: float = 1.0):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix="model.embed_tokens")
        self.embed_scale = embed_scale
        rope = get_rope(config, config.qk_rope_head_dim, is_neox_style=rope_neox)
        self.layers = nn.ModuleList(
            DeepseekV2DecoderLayer(config, i, rope, quant_config, f"model.layers.{i}",
                                   residual_scale)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return run_decoder_stack(self, input_ids, positions, batch, input_embeds)


class DeepseekV2ForCausalLM(nn.Module):
    # our fused parameters gather these checkpoint pieces (dense MLPs, shared experts)
    stacked_params = [("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]

    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None):
        super().__init__()
        self.config = config
        self.model = DeepseekV2Model(config, quant_config, rope_neox=self._rope_neox(config),
                                     **self._scales(config))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)
        self.num_layers = config.num_hidden_layers
        # the KV pool: one latent "head" per token (asgl/engine/worker/latent_kv_cache.py)
        self.kv_latent_dims = (config.kv_lora_rank, config.qk_rope_head_dim)
        self.num_kv_heads = 1
        self.head_dim = config.kv_lora_rank + config.qk_rope_head_dim
        self.logits_divisor = 1.0  # hidden states divided by it before the LM head

    @staticmethod
    def _rope_neox(config: Any) -> bool:
        return False  # DeepSeek V2: interleaved pairs

    @staticmethod
    def _scales(config: Any) -> dict[str, float]:
        return {}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids, positions, batch, input_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.logits_divisor != 1.0:
            hidden = hidden / self.logits_divisor
        return self.lm_head.compute_logits(hidden)  # float32

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF-named tensors; every parameter must be filled exactly by the checkpoint."""
        assign_weights(self, self._map_weights(weights))

    def _map_weights(self, weights):
        n_layers = self.config.num_hidden_layers
        for name, tensor in weights:
            if "rotary_emb." in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if name.startswith("model.layers."):
                layer = int(name.split(".")[2])
                if layer >= n_layers:  # V3's multi-token-prediction layers: not served
                    continue
                mlp = getattr(self.model.layers[layer].mlp, "map_weight", None)
                if mlp is not None and ".mlp." in name:
                    mapped = mlp(name, tensor)
                    if mapped is not None:
                        yield mapped
                        continue
            source, shard_id = name, None
            for fused, piece, shard in self.stacked_params:
                if f".{piece}." in name:
                    name, shard_id = name.replace(f".{piece}.", f".{fused}."), shard
                    break
            yield source, name, tensor, shard_id


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """V3 / R1: V2's MLA; its MoE routes by sigmoid scores with a correction bias (in the
    MoE layer); `rope_interleave: false` checkpoints pair the rope halves."""

    @staticmethod
    def _rope_neox(config: Any) -> bool:
        return getattr(config, "rope_interleave", True) is False


class MiniCPM3ForCausalLM(DeepseekV2ForCausalLM):
    @staticmethod
    def _rope_neox(config: Any) -> bool:
        return True

    @staticmethod
    def _scales(config: Any) -> dict[str, float]:
        depth = config.scale_depth if config.scale_depth is not None else math.sqrt(
            config.num_hidden_layers)
        return dict(embed_scale=float(config.scale_emb),
                    residual_scale=depth / math.sqrt(config.num_hidden_layers))

    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None):
        super().__init__(config, quant_config)
        self.logits_divisor = config.hidden_size / (config.dim_model_base or config.hidden_size)
