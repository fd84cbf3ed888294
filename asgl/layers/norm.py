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


class LayerNorm(nn.Module):
    """LayerNorm (mean-subtracting), optionally without bias (Cohere), with RMSNorm's
    `forward(x, residual)` contract so decoder layers treat both alike. Statistics in
    float32 (Cohere's HF code does; nn.LayerNorm's kernels accumulate in float32 too)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, bias: bool = True,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(hidden_size, dtype=dtype), requires_grad=False)
                     if bias else None)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.float() if self.bias is not None else None
        out = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), self.weight.float(),
                                             bias, self.eps)
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"


class HeadLayerNorm(nn.Module):
    """Bias-free LayerNorm over each head's dims with a weight per head, [heads, head_dim]
    (Cohere's and StableLM's q/k norms). Under tensor parallelism each rank keeps its own heads' rows."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5, *,
                 first_head: int = 0, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.eps, self.head_dim, self.first_head = eps, head_dim, first_head
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, head: Optional[int] = None) -> None:
        """The whole [heads, head_dim] tensor, or (StableLM: a LayerNorm module per head)
        the row of global head `head`, ignored when another rank holds that head."""
        with torch.no_grad():
            if head is None:
                param.copy_(loaded.narrow(0, self.first_head, param.shape[0]))
            elif 0 <= head - self.first_head < param.shape[0]:
                param[head - self.first_head].copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads * head_dim] -> same shape."""
        shape = x.shape
        xf = x.float().view(shape[0], -1, self.head_dim)
        out = torch.nn.functional.layer_norm(xf, (self.head_dim,), None, None, self.eps)
        return (out * self.weight.float()).to(x.dtype).view(shape)
