"""Router top-k in one kernel: logits [T, E] -> (weights [T, k] float32, ids [T, k] int32),
one program per token: softmax (or sigmoid) scores, an optional per-expert bias added for
the choice only, k rounds of arg-max (ties to the lower expert id), the chosen scores
renormalized to sum 1 if asked, times a scale. It replaces the ~6 torch ops of
`asgl.layers.moe.router.select_experts` at decode (launches dominate there); grouped
top-k and p-norms other than 1 stay in torch. `select_experts` is its reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_kernel(L, BIAS, W, IDS, E, stride_l, scale,
                 K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr,
                 SIGMOID: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E_POW2)
    ok = offs < E
    x = tl.load(L + row * stride_l + offs, mask=ok, other=-float("inf")).to(tl.float32)
    if SIGMOID:
        s = tl.sigmoid(x)
    else:
        e = tl.exp(x - tl.max(x, axis=0))
        s = e / tl.sum(e, axis=0)
    choice = s
    if HAS_BIAS:
        choice = s + tl.load(BIAS + offs, mask=ok, other=0.0).to(tl.float32)
    choice = tl.where(ok, choice, -float("inf"))
    slots = tl.arange(0, K_POW2)
    weights = tl.zeros([K_POW2], dtype=tl.float32)
    ids = tl.zeros([K_POW2], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(choice, axis=0)
        # a NaN row matches nothing: clamp, so that no id past the experts escapes
        idx = tl.minimum(tl.min(tl.where(choice == best, offs, E_POW2), axis=0), E - 1)
        w = tl.sum(tl.where(offs == idx, s, 0.0), axis=0)
        weights = tl.where(slots == j, w, weights)
        ids = tl.where(slots == j, idx, ids)
        choice = tl.where(offs == idx, -float("inf"), choice)
    if RENORM:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    weights = weights * scale
    tl.store(W + row * K + slots, weights, mask=slots < K)
    tl.store(IDS + row * K + slots, ids, mask=slots < K)


def fused_topk(logits: torch.Tensor, top_k: int, *, sigmoid: bool = False,
               renormalize: bool = True, scale: float = 1.0,
               correction_bias: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    assert logits.stride(1) == 1
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    if T:
        _topk_kernel[(T,)](
            logits, correction_bias if correction_bias is not None else logits, weights, ids,
            E, logits.stride(0), float(scale), K=top_k, K_POW2=triton.next_power_of_2(top_k),
            E_POW2=triton.next_power_of_2(E), SIGMOID=sigmoid, RENORM=renormalize,
            HAS_BIAS=correction_bias is not None, num_warps=4 if E >= 512 else 1)
    return weights, ids
