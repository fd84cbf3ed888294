"""Float32 torch references for MoE families transformers lacks: Grok-1, XVERSE-MoE and
DeepSeek V1. Each is a small transcription of the published modelling equations (written
here, not copied), holding its tensors under the published checkpoint names:

- Grok-1: hpcai-tech/grok-1 `modeling_grok1.py` (HF hub; read as vendored in
  tenstorrent/tt-metal `models/experimental/grok/reference/model.py` @ 390dce043ad4b7bee60dde
  81cce8d65c5c6d3780), checked against xai-org/grok-1 `model.py` @ 1a0ba385eb824f0a1030fe7f4
  cbfc625f1addd2d (softmax top-k not renormalized). Decoder: h = embed * embedding_multiplier;
  per layer h += post_attn_norm(attn(pre_attn_norm(h))), h += post_moe_norm(moe(pre_moe_norm
  (h))); scores = q.k * attn_output_multiplier, capped max_attn_value * tanh(s / max);
  RMSNorm `scale` * x / rms(x); RoPE base 10000 (rotate-half); experts
  linear_1(gelu(linear(x)) * linear_v(x)) with exact GELU; logits = norm(h) @ embed.T *
  output_multiplier_scale (tied head).
- XVERSE-MoE: xverse-ai/XVERSE-MoE-A4.2B `modeling_xverse.py` (HF hub only, not readable
  here); the equations as transcribed in sgl-project/sglang
  `python/sglang/srt/models/xverse_moe.py` @ 01925ca8c3ab348298b25a81a552dd08c448980a: Llama
  decoder; `mlp.router` softmax, top-`moe_top_k`, renormalized only with `norm_topk_prob`;
  + `mlp.shared_experts` (one SwiGLU MLP of intermediate_size * num_shared_experts), ungated.
- DeepSeek V1: deepseek-ai/deepseek-moe-16b-base `modeling_deepseek.py` (HF hub): Llama
  decoder; layer i MoE iff n_routed_experts and i >= first_k_dense_replace and
  i % moe_layer_freq == 0; `MoEGate` softmax, top-k, divided by the sum only with
  `norm_topk_prob`; + `shared_experts` MLP of moe_intermediate_size * n_shared_experts.

A reference is called like an HF model: `ref(ids [1, T]).logits` -> [1, T, V] float32.
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """x [T, heads, d] at positions 0..T-1 (NeoX halves)."""
    T, _, d = x.shape
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    phase = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]
    phase = torch.cat((phase, phase), dim=-1)[:, None, :]
    return x * phase.cos() + _rotate_half(x) * phase.sin()


def _attention(q, k, v, scale: float, cap: float = 0.0) -> torch.Tensor:
    """q [T, H, d], k/v [T, KV, d] -> [T, H * d], causal, grouped KV heads."""
    T, H, d = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.einsum("thd,shd->hts", q, k) * scale
    if cap:
        s = cap * torch.tanh(s / cap)
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v).reshape(T, H * d)


class _Reference:
    """Tensors by published name, a config dict, and the shared decoder pieces."""

    def __init__(self, config: dict[str, Any], seed: int):
        self.config = config
        self.c = SimpleNamespace(**config)
        self.gen = torch.Generator().manual_seed(seed)
        self.w: dict[str, torch.Tensor] = {}

    def _new(self, name: str, *shape: int, scale: float = 0.1, offset: float = 0.0) -> None:
        self.w[name] = torch.randn(*shape, generator=self.gen) * scale + offset

    def _attn_weights(self, p: str, bias: bool = False, o: str = "o_proj") -> None:
        c = self.c
        d = c.hidden_size // c.num_attention_heads
        for n, rows in (("q_proj", c.num_attention_heads), ("k_proj", c.num_key_value_heads),
                        ("v_proj", c.num_key_value_heads)):
            self._new(f"{p}.{n}.weight", rows * d, c.hidden_size)
            if bias:
                self._new(f"{p}.{n}.bias", rows * d)
        self._new(f"{p}.{o}.weight", c.hidden_size, c.num_attention_heads * d)
        if bias:
            self._new(f"{p}.{o}.bias", c.hidden_size)

    def _self_attn(self, p: str, x: torch.Tensor, scale: float, cap: float = 0.0,
                   bias: bool = False, o: str = "o_proj") -> torch.Tensor:
        c, w = self.c, self.w
        d = c.hidden_size // c.num_attention_heads
        T = x.shape[0]

        def proj(n):
            return F.linear(x, w[f"{p}.{n}.weight"], w.get(f"{p}.{n}.bias") if bias else None)
        theta = float(self.config.get("rope_theta", 10000.0))
        q = _rope(proj("q_proj").view(T, -1, d), theta)
        k = _rope(proj("k_proj").view(T, -1, d), theta)
        v = proj("v_proj").view(T, -1, d)
        out = _attention(q, k, v, scale, cap)
        return F.linear(out, w[f"{p}.{o}.weight"], w.get(f"{p}.{o}.bias") if bias else None)

    def _mlp_weights(self, p: str, inter: int, names=("gate_proj", "up_proj", "down_proj")):
        h = self.c.hidden_size
        self._new(f"{p}.{names[0]}.weight", inter, h)
        self._new(f"{p}.{names[1]}.weight", inter, h)
        self._new(f"{p}.{names[2]}.weight", h, inter)

    def _mlp(self, p: str, x: torch.Tensor, act=F.silu,
             names=("gate_proj", "up_proj", "down_proj")) -> torch.Tensor:
        w = self.w
        g = act(F.linear(x, w[f"{p}.{names[0]}.weight"]))
        return F.linear(g * F.linear(x, w[f"{p}.{names[1]}.weight"]), w[f"{p}.{names[2]}.weight"])

    def _routed(self, p: str, x: torch.Tensor, router: str, n_experts: int, top_k: int,
                renorm: bool, act=F.silu, names=("gate_proj", "up_proj", "down_proj")):
        """softmax over the experts, top-k (each token's chosen experts, weighted)."""
        probs = F.linear(x, self.w[f"{p}.{router}.weight"]).softmax(dim=-1)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renorm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(n_experts):
            rows, slot = torch.where(ids == e)
            if rows.numel():
                y = self._mlp(f"{p}.experts.{e}", x[rows], act, names)
                out.index_add_(0, rows, y * weights[rows, slot, None])
        return out

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        with torch.no_grad():
            return SimpleNamespace(logits=self.forward(ids[0])[None])

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.w.items()},
                  os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.config, f, indent=1)


class Grok1Reference(_Reference):
    def __init__(self, config: dict[str, Any], seed: int = 0):
        super().__init__(config, seed)
        c = self.c
        self._new("model.embed_tokens.weight", c.vocab_size, c.hidden_size)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            self._attn_weights(f"{p}.attn")
            for n in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
                self._new(f"{p}.{n}.scale", c.hidden_size, scale=0.3, offset=1.0)
            self._new(f"{p}.moe_block.gate.weight", c.num_experts, c.hidden_size, scale=0.5)
            for e in range(c.num_experts):
                q = f"{p}.moe_block.experts.{e}"
                self._mlp_weights(q, c.intermediate_size, ("linear", "linear_v", "linear_1"))
                # GELU inputs of a few units, where its exact and tanh forms differ most
                self.w[f"{q}.linear.weight"] *= 4.0
        self._new("model.norm.scale", c.hidden_size, scale=0.3, offset=1.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        c, w = self.c, self.w
        h = F.embedding(ids, w["model.embed_tokens.weight"]) * c.embedding_multiplier_scale
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            x = _rms(h, w[f"{p}.pre_attn_norm.scale"], c.rms_norm_eps)
            x = self._self_attn(f"{p}.attn", x, c.attn_output_multiplier, c.max_attn_value)
            h = h + _rms(x, w[f"{p}.post_attn_norm.scale"], c.rms_norm_eps)
            x = _rms(h, w[f"{p}.pre_moe_norm.scale"], c.rms_norm_eps)
            x = self._routed(f"{p}.moe_block", x, "gate", c.num_experts, c.num_experts_per_tok,
                             renorm=False, act=lambda t: F.gelu(t),
                             names=("linear", "linear_v", "linear_1"))
            h = h + _rms(x, w[f"{p}.post_moe_norm.scale"], c.rms_norm_eps)
        h = _rms(h, w["model.norm.scale"], c.rms_norm_eps)
        return (h @ w["model.embed_tokens.weight"].T) * c.output_multiplier_scale


class _LlamaLikeMoE(_Reference):
    """The Llama decoder (pre-norm, RMSNorm `weight`, SwiGLU) with a family's MoE block."""

    def _build(self, bias: bool = False) -> None:
        c = self.c
        self.bias = bias
        self._new("model.embed_tokens.weight", c.vocab_size, c.hidden_size)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            self._attn_weights(f"{p}.self_attn", bias)
            for n in ("input_layernorm", "post_attention_layernorm"):
                self._new(f"{p}.{n}.weight", c.hidden_size, scale=0.3, offset=1.0)
            self._moe_weights(i, f"{p}.mlp")
        self._new("model.norm.weight", c.hidden_size, scale=0.3, offset=1.0)
        self._new("lm_head.weight", c.vocab_size, c.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        c, w = self.c, self.w
        d = c.hidden_size // c.num_attention_heads
        h = F.embedding(ids, w["model.embed_tokens.weight"])
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            x = _rms(h, w[f"{p}.input_layernorm.weight"], c.rms_norm_eps)
            h = h + self._self_attn(f"{p}.self_attn", x, 1.0 / math.sqrt(d), bias=self.bias)
            x = _rms(h, w[f"{p}.post_attention_layernorm.weight"], c.rms_norm_eps)
            h = h + self._moe(i, f"{p}.mlp", x)
        return F.linear(_rms(h, w["model.norm.weight"], c.rms_norm_eps), w["lm_head.weight"])


class XverseMoeReference(_LlamaLikeMoE):
    def __init__(self, config: dict[str, Any], seed: int = 0):
        super().__init__(config, seed)
        self._build()

    def _moe_weights(self, i: int, p: str) -> None:
        c = self.c
        self._new(f"{p}.router.weight", c.num_experts, c.hidden_size, scale=0.5)
        for e in range(c.num_experts):
            self._mlp_weights(f"{p}.experts.{e}", c.intermediate_size)
        self._mlp_weights(f"{p}.shared_experts", c.intermediate_size * c.num_shared_experts)

    def _moe(self, i: int, p: str, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        routed = self._routed(p, x, "router", c.num_experts, c.moe_top_k,
                              bool(self.config.get("norm_topk_prob", False)))
        return routed + self._mlp(f"{p}.shared_experts", x)


class DeepseekV1Reference(_LlamaLikeMoE):
    def __init__(self, config: dict[str, Any], seed: int = 0):
        super().__init__(config, seed)
        self._build(bias=bool(config.get("attention_bias", False)))

    def sparse(self, i: int) -> bool:
        c = self.c
        return (c.n_routed_experts is not None and i >= c.first_k_dense_replace
                and i % c.moe_layer_freq == 0)

    def _moe_weights(self, i: int, p: str) -> None:
        c = self.c
        if not self.sparse(i):
            self._mlp_weights(p, c.intermediate_size)
            return
        self._new(f"{p}.gate.weight", c.n_routed_experts, c.hidden_size, scale=0.5)
        for e in range(c.n_routed_experts):
            self._mlp_weights(f"{p}.experts.{e}", c.moe_intermediate_size)
        self._mlp_weights(f"{p}.shared_experts", c.moe_intermediate_size * c.n_shared_experts)

    def _moe(self, i: int, p: str, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        if not self.sparse(i):
            return self._mlp(p, x)
        routed = self._routed(p, x, "gate", c.n_routed_experts, c.num_experts_per_tok,
                              c.norm_topk_prob)
        return routed + self._mlp(f"{p}.shared_experts", x)
