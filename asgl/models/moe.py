"""Mixture-of-experts decoder families: the Llama decoder (llama.py) whose MLP is a sparse
MoE block (`DecoderArch.mlp_factory`) on some or all layers.

- Mixtral: softmax top-2 over 8 experts, renormalized; checkpoint names
  `block_sparse_moe.{gate, experts.<e>.w1/w3/w2}`; Mistral's sliding window if set.
- Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): + a shared expert whose output is scaled by
  sigmoid(`shared_expert_gate`(x)); top-k renormalized per `norm_topk_prob`; bias on q/k/v;
  dense MLP layers per `mlp_only_layers` / `decoder_sparse_step`.
- Qwen3-MoE: Qwen 3's per-head q/k RMSNorm; no shared expert.
- OLMoE: q/k RMSNorm over all heads (OLMo 2's), top-k not renormalized by default;
  optional q/k/v clipping.
- DBRX: bias-free LayerNorm, fused Wqkv clipped to [-clip_qkv, clip_qkv], experts stored
  stacked (`ffn.experts.mlp.w1/v1/w2`, each [E * I, H], w2 transposed), router weights
  divided by their p-norm (`moe_normalize_expert_weights`).

The block computes the experts' and the shared expert's partial sums on each TP rank and
all-reduces once.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from asgl.distributed import tensor_model_parallel_all_reduce
from asgl.layers.activation import get_act_and_mul
from asgl.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from asgl.layers.moe import FusedMoE, MoEGate, RouterConfig, map_expert_weight
from asgl.layers.moe.fused_moe import ACTIVATIONS
from asgl.layers.quant import QuantizationConfig
from asgl.models.llama import DecoderArch, LlamaForCausalLM, LlamaMLP


class SharedExpertMLP(nn.Module):
    """A gated MLP whose down projection is not all-reduced (the MoE block reduces the sum)."""

    def __init__(self, hidden: int, intermediate: int, act: str,
                 quant_config: Optional[QuantizationConfig], prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, False,
                                                       quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate, hidden, False, reduce_results=False,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = get_act_and_mul(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """Router gate + routed experts (+ a shared expert, optionally sigmoid-gated)."""

    def __init__(self, config: Any, num_experts: int, moe_intermediate: int,
                 router: RouterConfig, quant_config: Optional[QuantizationConfig], prefix: str,
                 shared_intermediate: int = 0, shared_gate: bool = False,
                 activation: Optional[str] = None):
        super().__init__()
        # `activation`: the experts' own (Grok-1's GELU, which its config does not name)
        h, act = config.hidden_size, activation or config.hidden_act
        act = "silu" if act == "swish" else act
        if act not in ACTIVATIONS:
            raise ValueError(f"MoE experts with activation {act!r} are not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        self.gate = MoEGate(h, num_experts)
        self.experts = FusedMoE(num_experts, h, moe_intermediate, router, activation=act,
                                reduce_results=False, prefix=f"{prefix}.experts")
        self.shared_expert = (SharedExpertMLP(h, shared_intermediate, act, quant_config,
                                              f"{prefix}.shared_expert")
                              if shared_intermediate else None)
        self.shared_expert_gate = (ReplicatedLinear(h, 1, bias=False,
                                                    prefix=f"{prefix}.shared_expert_gate")
                                   if shared_gate else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = F.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return tensor_model_parallel_all_reduce(out)


def num_experts(config: Any) -> int:
    """The routed experts' count under any of its config names (transformers maps one to
    the other, but a plain dict of a config keeps the one it was saved with)."""
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError("the config names no expert count (num_experts / num_local_experts)")


class _MoEForCausalLM(LlamaForCausalLM):
    """A Llama decoder with `moe_block` as the MLP of its sparse layers."""

    # checkpoint names of the experts' projections: (gate, up, down)
    expert_names = ("gate_proj", "up_proj", "down_proj")
    # checkpoint name of the MoE block -> ours (Mixtral's block_sparse_moe)
    block_name: Optional[str] = None

    @classmethod
    def moe_arch(cls, config: Any) -> DecoderArch:
        """The decoder switches besides the MLP (subclasses override)."""
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(qkv_bias=bias, o_bias=bias)

    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        return dataclasses.replace(cls.moe_arch(config), mlp_factory=cls.make_mlp)

    @classmethod
    def make_mlp(cls, config: Any, layer_id: int, quant_config: Optional[QuantizationConfig],
                 prefix: str) -> nn.Module:
        if not cls.is_sparse_layer(config, layer_id):
            return LlamaMLP(config, quant_config, prefix)
        return cls.moe_block(config, quant_config, prefix)

    @staticmethod
    def is_sparse_layer(config: Any, layer_id: int) -> bool:
        """Qwen-MoE's rule: sparse unless listed in mlp_only_layers, every
        decoder_sparse_step-th layer (every layer when the config has neither)."""
        if layer_id in (getattr(config, "mlp_only_layers", None) or []):
            return False
        return (layer_id + 1) % (getattr(config, "decoder_sparse_step", None) or 1) == 0

    @classmethod
    def moe_block(cls, config: Any, quant_config: Optional[QuantizationConfig],
                  prefix: str) -> nn.Module:
        renorm = bool(getattr(config, "norm_topk_prob", False))
        return SparseMoeBlock(config, num_experts(config), config.moe_intermediate_size,
                              RouterConfig(top_k=config.num_experts_per_tok, renormalize=renorm),
                              quant_config, prefix)

    def _map_weights(self, weights):
        gate, up, down = self.expert_names
        for name, tensor in weights:
            source = name
            if self.block_name is not None:
                name = name.replace(f".{self.block_name}.", ".mlp.")
            mapped = map_expert_weight(name, gate, up, down)
            if mapped is not None:
                yield source, mapped[0], tensor, mapped[1]
                continue
            for _, param, t, shard in super()._map_weights([(name, tensor)]):
                yield source, param, t, shard


class MixtralForCausalLM(_MoEForCausalLM):
    expert_names = ("w1", "w3", "w2")
    block_name = "block_sparse_moe"

    @classmethod
    def moe_block(cls, config, quant_config, prefix):
        return SparseMoeBlock(config, num_experts(config), config.intermediate_size,
                              RouterConfig(top_k=config.num_experts_per_tok, renormalize=True),
                              quant_config, prefix)


class Qwen2MoeForCausalLM(_MoEForCausalLM):
    @classmethod
    def moe_arch(cls, config):
        return DecoderArch(qkv_bias=bool(getattr(config, "qkv_bias", True)), o_bias=False)

    @classmethod
    def moe_block(cls, config, quant_config, prefix):
        renorm = bool(getattr(config, "norm_topk_prob", False))
        return SparseMoeBlock(config, num_experts(config), config.moe_intermediate_size,
                              RouterConfig(top_k=config.num_experts_per_tok, renormalize=renorm),
                              quant_config, prefix,
                              shared_intermediate=config.shared_expert_intermediate_size,
                              shared_gate=True)


class Qwen3MoeForCausalLM(_MoEForCausalLM):
    @classmethod
    def moe_arch(cls, config):
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(qkv_bias=bias, o_bias=bias, qk_norm="head")


class OlmoeForCausalLM(_MoEForCausalLM):
    @classmethod
    def moe_arch(cls, config):
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(qkv_bias=bias, o_bias=bias, qk_norm="full",
                           clip_qkv=getattr(config, "clip_qkv", None))

    @classmethod
    def moe_block(cls, config, quant_config, prefix):
        renorm = bool(getattr(config, "norm_topk_prob", False))
        return SparseMoeBlock(config, num_experts(config), config.intermediate_size,
                              RouterConfig(top_k=config.num_experts_per_tok, renormalize=renorm),
                              quant_config, prefix)


# DBRX checkpoint names -> ours (the Llama decoder's)
_DBRX_NAMES = [("transformer.wte.", "model.embed_tokens."), ("transformer.norm_f.", "model.norm."),
               ("transformer.blocks.", "model.layers."),
               (".norm_attn_norm.norm_1.", ".input_layernorm."),
               (".norm_attn_norm.norm_2.", ".post_attention_layernorm."),
               (".norm_attn_norm.attn.Wqkv.", ".self_attn.qkv_proj."),
               (".norm_attn_norm.attn.out_proj.", ".self_attn.o_proj."),
               (".ffn.router.layer.", ".mlp.gate.")]
_DBRX_EXPERTS = {"w1": "gate", "v1": "up", "w2": "down"}


class DbrxForCausalLM(_MoEForCausalLM):
    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None):
        super().__init__(self._llama_view(config), quant_config)
        self.config = config  # the checkpoint's (dummy weights under TP rebuild from it)

    @staticmethod
    def _llama_view(config: Any) -> Any:
        """The fields the Llama decoder reads, from DBRX's nested config (dicts in a
        checkpoint's config.json, objects once transformers parsed it)."""
        attn, ffn = (c if isinstance(c, dict) else c.to_dict() if hasattr(c, "to_dict")
                     else vars(c) for c in (config.attn_config, config.ffn_config))
        view = copy.copy(config)
        act = (ffn.get("ffn_act_fn") or {}).get("name", "silu")
        fields = dict(hidden_size=config.d_model, num_attention_heads=config.n_heads,
                      num_hidden_layers=config.n_layers, num_key_value_heads=attn["kv_n_heads"],
                      max_position_embeddings=config.max_seq_len, hidden_act=act,
                      intermediate_size=ffn["ffn_hidden_size"], layer_norm_eps=1e-5,
                      num_experts=ffn["moe_num_experts"], num_experts_per_tok=ffn["moe_top_k"],
                      moe_norm_p=ffn.get("moe_normalize_expert_weights"),
                      clip_qkv=attn.get("clip_qkv"))
        if not getattr(config, "rope_parameters", None):
            fields["rope_theta"] = attn.get("rope_theta", 10000.0)
        for key, value in fields.items():
            setattr(view, key, value)
        return view

    @classmethod
    def moe_arch(cls, config):
        return DecoderArch(norm="layer_nobias", norm_eps_attr="layer_norm_eps",
                           clip_qkv=config.clip_qkv)

    @classmethod
    def moe_block(cls, config, quant_config, prefix):
        p = config.moe_norm_p
        router = RouterConfig(top_k=config.num_experts_per_tok, renormalize=p is not None,
                              norm_p=float(p or 1.0))
        return SparseMoeBlock(config, num_experts(config), config.intermediate_size, router,
                              quant_config, prefix)

    def _map_weights(self, weights):
        experts = self.model.layers[0].mlp.experts
        E, I, H = experts.num_experts, experts.intermediate_size, experts.hidden_size
        for name, tensor in weights:
            source = name
            for theirs, ours in _DBRX_NAMES:
                name = name.replace(theirs, ours)
            head, _, last = name.rpartition(".ffn.experts.mlp.")
            if head and last in _DBRX_EXPERTS:
                stacked = tensor.view(E, I, H)
                if last == "w2":  # stored [I, H] per expert: the transposed down projection
                    stacked = stacked.transpose(1, 2)
                param = "w2_weight" if last == "w2" else "w13_weight"
                yield source, f"{head}.mlp.experts.{param}", stacked, (None, _DBRX_EXPERTS[last])
                continue
            for _, param, t, shard in LlamaForCausalLM._map_weights(self, [(name, tensor)]):
                yield source, param, t, shard
