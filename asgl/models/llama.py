"""Llama family: Llama 2/3/3.1 (rope scaling), SmolLM2, Mistral (sliding window) and Qwen2
(bias on q/k/v). A pre-norm decoder with fused qkv and gate_up projections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from asgl.distributed import get_tp_rank, get_tp_size
from asgl.engine.contracts.forward_batch import ForwardBatch
from asgl.layers.activation import get_act_and_mul
from asgl.layers.attention import Attention
from asgl.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from asgl.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from asgl.layers.norm import HeadLayerNorm, LayerNorm, RMSNorm
from asgl.layers.quant import QuantizationConfig
from asgl.layers.rotary import RotaryEmbedding, get_rope, rope_parameters
from asgl.models.weights import assign_weights

@dataclass(frozen=True)
class DecoderArch:
    """What a family changes in the Llama decoder (defaults: Llama). Families derive it from
    their HF config in `decoder_arch`; the module tree and the math follow from it."""

    qkv_bias: bool = False
    o_bias: bool = False
    norm: str = "rms"  # rms | gemma (scale 1 + w) | layer (LayerNorm + bias) | layer_nobias
    # pre: Llama; sandwich: norms before and after attention and MLP (Gemma 2/3);
    # post: norms after attention and MLP only (OLMo 2); parallel: attention and MLP both
    # read the input norm and add to the residual together (Cohere, StableLM variants).
    style: str = "pre"
    qk_norm: Optional[str] = None  # head: per head over head_dim | full: over all heads (OLMo 2)
    # | head_ln: LayerNorm per head with a weight per head (Cohere)
    scaling: Optional[float] = None  # softmax scale; None: head_dim ** -0.5
    attn_logit_cap: float = 0.0  # attention soft-capping (Gemma 2)
    final_logit_cap: float = 0.0  # soft-capping of the output logits (Gemma 2)
    logit_scale: float = 1.0  # output logits multiplied by it (Cohere, Granite)
    embed_scale: float = 1.0  # embeddings multiplied by it (Gemma, Granite)
    embed_scale_in_dtype: bool = False  # round the scale to the model dtype first (Gemma)
    residual_scale: float = 1.0  # attention/MLP outputs scaled before the residual add (Granite)
    rope_neox: bool = True  # False: GPT-J interleaved pairs (Cohere)
    rope_sliding_only: bool = False  # global layers use no position encoding (Cohere 2)
    act: Optional[str] = None  # None: config.hidden_act
    norm_eps_attr: str = "rms_norm_eps"
    # (config, layer_id, quant_config, prefix) -> the layer's MLP (MoE families, models/moe.py);
    # None: LlamaMLP
    mlp_factory: Optional[Callable[..., nn.Module]] = None
    clip_qkv: Optional[float] = None  # q/k/v clamped to [-c, c] after the projection (DBRX)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _sliding_window(config: Any, layer_id: int) -> Optional[int]:
    """Mistral windows every layer; Qwen2 / Gemma 2/3 only the layers `layer_types` marks
    sliding."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[layer_id] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", None) is False:
        return None
    return getattr(config, "sliding_window", None)


def make_norm(arch: DecoderArch, size: int, eps: float) -> nn.Module:
    if arch.norm in ("rms", "gemma"):
        return RMSNorm(size, eps, gemma=arch.norm == "gemma")
    if arch.norm in ("layer", "layer_nobias"):
        return LayerNorm(size, eps, bias=arch.norm == "layer")
    raise ValueError(f"unknown norm {arch.norm!r}")


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig], prefix: str,
                 act: Optional[str] = None):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(h, [i, i], bias, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(i, h, bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = get_act_and_mul(act or config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary_emb: Optional[RotaryEmbedding],
                 qkv_bias: bool, o_bias: bool, quant_config: Optional[QuantizationConfig],
                 prefix: str, arch: Optional[DecoderArch] = None):
        super().__init__()
        arch = arch or DecoderArch()
        head_dim = _head_dim(config)
        self.head_dim = head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, qkv_bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        o_bias, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.rotary_emb = rotary_emb  # shared by every layer (of its layer type); None: NoPE
        self.clip_qkv = arch.clip_qkv
        self.qk_norm = arch.qk_norm
        eps = getattr(config, arch.norm_eps_attr)
        if arch.qk_norm == "head":
            self.q_norm = RMSNorm(head_dim, eps, gemma=arch.norm == "gemma")
            self.k_norm = RMSNorm(head_dim, eps, gemma=arch.norm == "gemma")
        elif arch.qk_norm == "full":
            if get_tp_size() > 1:  # the statistics would span every rank's heads
                raise NotImplementedError("q/k norm over all heads with tensor parallelism")
            self.q_norm = RMSNorm(self.q_size, eps)
            self.k_norm = RMSNorm(self.kv_size, eps)
        elif arch.qk_norm == "head_ln":
            qkv = self.qkv_proj
            self.q_norm = HeadLayerNorm(qkv.num_heads, head_dim, eps,
                                        first_head=get_tp_rank() * qkv.num_heads)
            self.k_norm = HeadLayerNorm(qkv.num_kv_heads, head_dim, eps,
                                        first_head=_kv_head_start(qkv))
        elif arch.qk_norm is not None:
            raise ValueError(f"unknown qk_norm {arch.qk_norm!r}")
        scaling = arch.scaling if arch.scaling is not None else head_dim ** -0.5
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, scaling,
                              self.qkv_proj.num_kv_heads, layer_id,
                              sliding_window=_sliding_window(config, layer_id),
                              logit_cap=arch.attn_logit_cap)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "head":  # RMSNorm over the last dim: view the heads as rows
            T = q.shape[0]
            q = self.q_norm(q.reshape(T, -1, self.head_dim)).view(T, -1)
            k = self.k_norm(k.reshape(T, -1, self.head_dim)).view(T, -1)
        elif self.qk_norm is not None:
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, batch))


def _kv_head_start(qkv: QKVParallelLinear) -> int:
    """The first KV head this rank holds (KV heads are replicated when fewer than ranks)."""
    if get_tp_size() >= qkv.total_num_kv_heads:
        return get_tp_rank() // qkv.num_kv_head_replicas
    return get_tp_rank() * qkv.num_kv_heads


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary_emb: Optional[RotaryEmbedding],
                 qkv_bias: bool, o_bias: bool, quant_config: Optional[QuantizationConfig],
                 prefix: str, arch: Optional[DecoderArch] = None):
        super().__init__()
        arch = arch or DecoderArch()
        self.style, self.residual_scale = arch.style, arch.residual_scale
        self.self_attn = LlamaAttention(config, layer_id, rotary_emb, qkv_bias, o_bias,
                                        quant_config, f"{prefix}.self_attn", arch)
        if arch.mlp_factory is not None:
            self.mlp = arch.mlp_factory(config, layer_id, quant_config, f"{prefix}.mlp")
        else:
            self.mlp = LlamaMLP(config, quant_config, f"{prefix}.mlp", arch.act)
        h, eps = config.hidden_size, getattr(config, arch.norm_eps_attr)
        if arch.style != "post":
            self.input_layernorm = make_norm(arch, h, eps)
        if arch.style != "parallel":
            self.post_attention_layernorm = make_norm(arch, h, eps)
        if arch.style in ("sandwich", "post"):
            self.post_feedforward_layernorm = make_norm(arch, h, eps)
        if arch.style == "sandwich":
            self.pre_feedforward_layernorm = make_norm(arch, h, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor],
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it is added): the
        caller's next norm fuses the add (the residual is None before the first layer)."""
        if self.style == "post":  # OLMo 2: no input norm; outputs normed before the add
            residual = x if residual is None else x + residual
            x = self.post_attention_layernorm(self.self_attn(positions, residual, batch))
            residual = x + residual
            return self.post_feedforward_layernorm(self.mlp(residual)), residual
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        if self.style == "parallel":
            return self.self_attn(positions, x, batch) + self.mlp(x), residual
        x = self.self_attn(positions, x, batch)
        if self.style == "sandwich":
            x, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(x),
                                                         residual)
            return self.post_feedforward_layernorm(self.mlp(x)), residual
        if self.residual_scale != 1.0:
            x = x * self.residual_scale
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        if self.residual_scale != 1.0:
            x = x * self.residual_scale
        return x, residual


def _layer_ropes(config: Any, head_dim: int,
                 arch: DecoderArch) -> list[Optional[RotaryEmbedding]]:
    """The rotary embedding of each layer: one module per distinct parameter set (Gemma 3
    gives sliding and full-attention layers different bases); None for a layer without
    position encoding."""
    layer_types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    by_params: dict[str, RotaryEmbedding] = {}
    out: list[Optional[RotaryEmbedding]] = []
    for layer_type in layer_types:
        if arch.rope_sliding_only and layer_type != "sliding_attention":
            out.append(None)
            continue
        key = repr(sorted(rope_parameters(config, layer_type).items()))
        if key not in by_params:
            by_params[key] = get_rope(config, head_dim, is_neox_style=arch.rope_neox,
                                      layer_type=layer_type)
        out.append(by_params[key])
    return out


class LlamaModel(nn.Module):
    """The decoder stack without the LM head: returns final hidden states (what embedding
    models pool)."""

    def __init__(self, config: Any, qkv_bias: bool, o_bias: bool,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "model",
                 arch: Optional[DecoderArch] = None):
        super().__init__()
        arch = dataclasses.replace(arch or DecoderArch(), qkv_bias=qkv_bias, o_bias=o_bias)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.embed_scale = arch.embed_scale
        if arch.embed_scale_in_dtype:  # HF Gemma: the scale rounded to the model dtype (the
            # default dtype while the model is built), a constant in forward
            self.embed_scale = float(torch.tensor(self.embed_scale, device="cpu",
                                                  dtype=torch.get_default_dtype()))
        ropes = _layer_ropes(config, _head_dim(config), arch)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, ropes[i], qkv_bias, o_bias, quant_config,
                              f"{prefix}.layers.{i}", arch)
            for i in range(config.num_hidden_layers))
        self.norm = make_norm(arch, config.hidden_size, getattr(config, arch.norm_eps_attr))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return run_decoder_stack(self, input_ids, positions, batch, input_embeds)


def run_decoder_stack(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                      batch: ForwardBatch, input_embeds: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """Embed (scaled), the layers with the residual carried between them, the final norm:
    the body of every decoder stack (`embed_tokens`, `embed_scale`, `layers`, `norm`)."""
    x = model.embed_tokens(input_ids) if input_embeds is None else input_embeds
    if model.embed_scale != 1.0:
        x = x * model.embed_scale
    residual = None
    for layer in model.layers:
        x, residual = layer(positions, x, residual, batch)
    return model.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # HF checkpoint names that our fused parameters gather: (fused, piece, shard id).
    stacked_params = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"),
                      ("qkv_proj", "v_proj", "v"), ("gate_up_proj", "gate_proj", 0),
                      ("gate_up_proj", "up_proj", 1)]

    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None):
        super().__init__()
        self.config = config
        arch = self.decoder_arch(config)
        self.arch = arch
        self.model = LlamaModel(config, arch.qkv_bias, arch.o_bias, quant_config, arch=arch)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = self.model.layers[0].self_attn.qkv_proj.num_kv_heads  # this rank's
        self.head_dim = _head_dim(config)

    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        """The family's decoder variant for this config (subclasses override)."""
        qkv_bias, o_bias = cls._attention_bias(config)
        return DecoderArch(qkv_bias=qkv_bias, o_bias=o_bias)

    @staticmethod
    def _attention_bias(config: Any) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o_proj)."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids, positions, batch, input_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden)  # float32
        arch = self.arch
        if arch.logit_scale != 1.0:
            logits = logits * arch.logit_scale
        if arch.final_logit_cap > 0:
            logits = torch.tanh(logits / arch.final_logit_cap) * arch.final_logit_cap
        return logits

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

