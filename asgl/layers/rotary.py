"""Rotary position embedding with a cos/sin cache computed once, applied by position index.

Styles: NeoX (HF Llama's `rotate_half`: the two halves of the rotary dims are paired) and
GPT-J (interleaved: dims 2i and 2i+1 are paired). Scaling (`rope_type`): default, linear,
llama3, yarn (as HF computes them), and dynamic NTK, which HF re-derives per sequence
length; here it is fixed once for the longest context (vLLM's choice), so the cache never
changes under a running request.
Frequencies and angles are float32 exactly as HF computes them, so logits match HF.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from asgl.layers.fused import use_fused


def _inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(base: float, dim: int, s: dict) -> torch.Tensor:
    inv_freq = _inv_freq(base, dim)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the middle band blended.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, s: dict, max_position: int) -> tuple[torch.Tensor, float]:
    old_len = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_position / old_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = s.get("attention_factor")
    if attn_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn_factor)


def _longrope_attn_factor(s: dict, max_position: int) -> float:
    factor = s.get("factor") or max_position / s["original_max_position_embeddings"]
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(s["original_max_position_embeddings"]))


def _longrope_freqs(base: float, dim: int, s: dict, cache_len: int) -> torch.Tensor:
    """[cache_len, dim / 2] angles (Phi-3's LongRoPE). HF picks one factor set for the whole
    sequence by its length (long once it passes the original context); positions are
    rotated once here and kept in the KV cache, so each position takes the set its own
    index falls in (as vLLM does): equal to HF for any sequence within the original
    context, and for the positions past it."""
    old_len = int(s["original_max_position_embeddings"])
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    pos = torch.arange(cache_len, dtype=torch.float32)
    short = torch.outer(pos, 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32)
                                    * base ** shape))
    long = torch.outer(pos, 1.0 / (torch.tensor(s["long_factor"], dtype=torch.float32)
                                   * base ** shape))
    return torch.where(pos[:, None] < old_len, short, long)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, base: float,
                 is_neox_style: bool = True, scaling: Optional[dict[str, Any]] = None):
        super().__init__()
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        self.is_neox_style = is_neox_style
        scaling = dict(scaling or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        attn_factor, cache_len = 1.0, max_position
        if rope_type == "default":
            inv_freq = _inv_freq(base, rotary_dim)
        elif rope_type == "linear":
            inv_freq = _inv_freq(base, rotary_dim) / scaling["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(base, rotary_dim, scaling)
        elif rope_type == "dynamic":
            factor = scaling["factor"]
            cache_len = int(max_position * factor)
            ntk = factor * cache_len / max_position - (factor - 1)
            base = base * ntk ** (rotary_dim / (rotary_dim - 2))
            inv_freq = _inv_freq(base, rotary_dim)
        elif rope_type == "yarn":
            inv_freq, attn_factor = _yarn_inv_freq(base, rotary_dim, scaling, max_position)
            cache_len = max(max_position, int(scaling["original_max_position_embeddings"]
                                              * (scaling.get("factor") or 1)))
        elif rope_type == "longrope":
            inv_freq, attn_factor = None, _longrope_attn_factor(scaling, max_position)
        else:
            raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: default, "
                             "linear, llama3, dynamic, yarn, longrope")
        if inv_freq is None:  # longrope: short factors up to the original length, long past it
            freqs = _longrope_freqs(base, rotary_dim, scaling, cache_len)
        else:
            freqs = torch.outer(torch.arange(cache_len, dtype=torch.float32), inv_freq)
        cache = torch.cat([freqs.cos() * attn_factor, freqs.sin() * attn_factor], dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)  # [cache_len, rotary_dim]

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, heads * head_dim] and k [T, kv_heads * head_dim] by `positions` [T].

        Half precision on CUDA: one Triton kernel rotates q and k in place (they are views
        into the fused qkv output, which nothing else reads) and returns them; otherwise
        new tensors."""
        if use_fused(q):
            from asgl.kernels.triton.rotary import rotary_embedding
            return rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_dim,
                                    self.is_neox_style)
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], shape[-1] // self.head_dim, self.head_dim)
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        if rest.shape[-1]:
            out = torch.cat([out, rest], dim=-1)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
                f"max_position={self.cos_sin_cache.shape[0]}, neox={self.is_neox_style}")


def rope_parameters(config: Any, layer_type: Optional[str] = None) -> dict[str, Any]:
    """The rope dict of an HF config, from transformers 5 (`rope_parameters`, which holds
    rope_theta, maybe per layer type) or 4 (`rope_theta` + `rope_scaling`)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    params = dict(params)
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return params


def get_rope(config: Any, head_dim: int, *, max_position: Optional[int] = None,
             is_neox_style: bool = True, layer_type: Optional[str] = None) -> RotaryEmbedding:
    """The rotary embedding an HF config asks for (theta, scaling, partial rotary factor)."""
    params = rope_parameters(config, layer_type)
    if getattr(config, "original_max_position_embeddings", None):  # Phi-3 keeps it here
        params.setdefault("original_max_position_embeddings",
                          config.original_max_position_embeddings)
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return RotaryEmbedding(head_dim, int(head_dim * partial),
                           max_position or config.max_position_embeddings, params["rope_theta"],
                           is_neox_style, params)
