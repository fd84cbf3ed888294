"""`MoEGate`: the router's linear layer (replicated on every rank), named like the HF
checkpoints' `gate` (`mlp.gate.weight`, DeepSeek V3's `mlp.gate.e_score_correction_bias`).

`forward(x [T, H]) -> router logits [T, E]`. `float32=True` computes the logits in float32
from a float32 weight (DeepSeek keeps its router weight in float32); otherwise in the
activation dtype, as Mixtral / Qwen-MoE / OLMoE do in HF. `correction_bias=True` adds the
float32 parameter `e_score_correction_bias` [E], handed to `FusedMoE.forward`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class MoEGate(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, *, bias: bool = False,
                 float32: bool = False, correction_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None):
        super().__init__()
        dtype = torch.float32 if float32 else (params_dtype or torch.get_default_dtype())
        self.float32 = float32
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(num_experts, dtype=dtype), requires_grad=False)
                     if bias else None)
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(num_experts, dtype=torch.float32), requires_grad=False)
            if correction_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float32:
            return F.linear(x.float(), self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
