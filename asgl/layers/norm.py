"""RMSNorm, optionally fused with the residual add that precedes it.

`forward(x)` returns the normalized x; `forward(x, residual)` first does
`residual = x + residual` and returns `(norm(residual), residual)`, the pattern of every
pre-norm decoder layer. Half precision on CUDA runs the fused Triton kernel (both in one
pass, asgl/kernels/triton/norm.py, same roundings); the torch code below is the reference.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from asgl.layers.fused import use_fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, *, gemma: bool = False,
                 params_dtype: torch.dtype | None = None):
        """`gemma=True`: the weight is stored as an offset, scale = 1 + w (Gemma's layout)."""
        super().__init__()
        self.eps = eps
        self.gemma = gemma
        init = torch.zeros if gemma else torch.ones
        self.weight = nn.Parameter(init(hidden_size, dtype=params_dtype or torch.get_default_dtype()),
                                   requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the activation dtype, as in HF.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:  # Gemma scales in float32 before casting back
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if use_fused(x):
            from asgl.kernels.triton.norm import rmsnorm
            # Out of place: x may be a caller's tensor (input_embeds); same traffic.
            return rmsnorm(x, self.weight, self.eps, residual, gemma=self.gemma)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, gemma={self.gemma}"
