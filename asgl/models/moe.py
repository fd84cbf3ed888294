"""Mixture-of-experts decoder families: the Llama decoder (llama.py) whose MLP is a sparse
MoE block (`DecoderArch.mlp_factory`) on some or all layers.

- Mixtral: softmax top-2 over 8 experts, renormalized; checkpoint names
  `block_sparse_moe.{gate, experts.<e>.w1/w3/w2}`; Mistral's sliding window if set.
- Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): + a shared expert whose output is scaled by
  sigmoid(`shared_expert_gate`(x)); top-k renormalized per `norm_topk_prob`; bias on q/k/v;
  dense MLP layers per `mlp_only_layers` / `decoder_sparse_step`.
- Qwen3-MoE: Qwen 3's per-head q/k RMSNorm; no shared expert.
- OLMoE: q/k RMSNorm over all heads (OLMo 2's), top-k not renormalized by default.

The block computes the experts' and the shared expert's partial sums on each TP rank and
all-reduces once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from asgl.distributed import tensor_model_parallel_all_reduce
from asgl.layers.activation import get_act_and_mul
from asgl.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from asgl.layers.moe import FusedMoE, MoEGate, RouterConfig, map_expert_weight
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
                 shared_intermediate: int = 0, shared_gate: bool = False):
        super().__init__()
        h, act = config.hidden_size, config.hidden_act
        if act not in ("silu", "swish"):
            raise ValueError(f"MoE experts with activation {act!r} are not supported")
        self.gate = MoEGate(h, num_experts)
        self.experts = FusedMoE(num_experts, h, moe_intermediate, router, reduce_results=False,
                                prefix=f"{prefix}.experts")
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
        return SparseMoeBlock(config, config.num_experts, config.moe_intermediate_size,
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
        return SparseMoeBlock(config, config.num_local_experts, config.intermediate_size,
                              RouterConfig(top_k=config.num_experts_per_tok, renormalize=True),
                              quant_config, prefix)


class Qwen2MoeForCausalLM(_MoEForCausalLM):
    @classmethod
    def moe_arch(cls, config):
        return DecoderArch(qkv_bias=bool(getattr(config, "qkv_bias", True)), o_bias=False)

    @classmethod
    def moe_block(cls, config, quant_config, prefix):
        renorm = bool(getattr(config, "norm_topk_prob", False))
        return SparseMoeBlock(config, config.num_experts, config.moe_intermediate_size,
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
        if getattr(config, "clip_qkv", None) is not None:
            raise NotImplementedError("OLMoE with clip_qkv is not supported")
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(qkv_bias=bias, o_bias=bias, qk_norm="full")

    @classmethod
    def moe_block(cls, config, quant_config, prefix):
        renorm = bool(getattr(config, "norm_topk_prob", False))
        return SparseMoeBlock(config, config.num_experts, config.intermediate_size,
                              RouterConfig(top_k=config.num_experts_per_tok, renormalize=renorm),
                              quant_config, prefix)
