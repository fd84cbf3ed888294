"""Gated activations over a fused [.., 2 * d] input (gate first, then up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asgl.layers.fused import use_fused


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):  # one pass instead of silu, then mul over a written-back silu
            from asgl.kernels.triton.activation import silu_and_mul
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    def __init__(self, approximate: str = "none"):
        """`approximate="tanh"` is HF's gelu_pytorch_tanh (Gemma)."""
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up


def get_act_and_mul(hidden_act: str) -> nn.Module:
    """The gated activation for an HF `hidden_act` / `hidden_activation` name."""
    if hidden_act in ("silu", "swish"):
        return SiluAndMul()
    if hidden_act in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"):
        return GeluAndMul("tanh")
    if hidden_act == "gelu":
        return GeluAndMul("none")
    raise ValueError(f"unsupported gated activation {hidden_act!r}")
