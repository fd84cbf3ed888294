"""Helpers shared by the Triton kernels.

The interpreter (`TRITON_INTERPRET=1`, how the CPU tests run) keeps bfloat16 as raw uint16
words and its `tl.dot` and arithmetic then work on those integers. Kernels therefore do all
arithmetic in float32 and, under the interpreter only, upcast dot operands to float32
(`DOT_F32`); on a GPU the dots stay in the input dtype so they use the tensor cores.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 models get IEEE float32 dots (not TF32) so they match the CPU bit for bit
    in their greedy choices; other dtypes ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def tl_dot(a, b, acc, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b, with float32 operands under the interpreter (see the module doc)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def tl_tanh(x):
    """tanh through sigmoid, which every triton version and the interpreter have."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def tl_logits2(s, qk_scale, logit_cap, SOFTCAP: tl.constexpr):
    """Raw q.k to base-2 logits: scaled, soft-capped when asked (Gemma 2), and times
    log2(e) so that the online softmax can use exp2."""
    if SOFTCAP:
        return logit_cap * tl_tanh(s * (qk_scale / logit_cap)) * 1.4426950408889634
    return s * (qk_scale * 1.4426950408889634)
