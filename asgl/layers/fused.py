"""Which path the elementwise layers take (RMSNorm, rotary, SiLU-and-mul, the KV store).

Half-precision activations on CUDA go through the fused Triton kernels of
asgl/kernels/triton: one kernel each where the torch reference launches 5-20 (at batch 1
a decode step is made of such launches). Everything else takes the torch reference:
the CPU never imports triton, and float32 on the GPU keeps the reference math so that the
fp32 GPU-vs-CPU greedy check compares like with like.

`ASGL_TORCH_LAYERS=1` forces the torch path (A/B timing, debugging); tests set `FORCE`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

_HALF = (torch.float16, torch.bfloat16)
_DISABLED = os.environ.get("ASGL_TORCH_LAYERS", "0") == "1"
# Tests: True runs the kernels on any device (the CPU under TRITON_INTERPRET=1), False
# never; None decides per tensor as above.
FORCE: Optional[bool] = None


def use_fused(x: torch.Tensor) -> bool:
    """Whether a layer should run its fused Triton kernel on activation `x`."""
    if torch.compiler.is_compiling():
        return False  # inductor fuses the reference path itself (asgl/engine/torch_compile.py)
    if FORCE is not None:
        return FORCE
    return x.is_cuda and x.dtype in _HALF and not _DISABLED
