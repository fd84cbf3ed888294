"""Torch reference of the routed experts (no triton): the CPU path of `FusedMoE` and the
reference the Triton grouped GEMM (`kernels/triton/fused_moe.py`) is tested against.

    out[t] = sum_j  w[t, j] * down_e( act(gate_e(x[t])) * up_e(x[t]) ),  e = ids[t, j]

with `w13` [E, 2I, H] (gate rows, then up rows) and `w2` [E, H, I]. Sums are taken in
float32 and rounded once to x's dtype. Experts are visited one by one (the hit list is
read on the host: fine on the CPU, not a GPU fast path). While a CUDA graph is being
captured (`ASGL_TORCH_LAYERS=1` on a GPU) the host cannot read it: every expert then runs
on every token, weighted by zero where it was not chosen (same result, E times the work).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def activation_and_mul(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """[.., 2I] -> act(gate) * up [.., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none") * up
    raise ValueError(f"unknown MoE activation {activation!r}")


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                      activation: str = "silu",
                      expert_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [T, H], topk_weights [T, k], topk_ids [T, k] (global ids; `expert_map` [E] maps
    them to this rank's local ids, -1 for experts held elsewhere, which add nothing)."""
    T, H = x.shape
    k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1).long()
    if expert_map is not None:
        ids = expert_map.long()[ids]
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return _dense_experts(x, w13, w2, topk_weights, ids.view(T, k), activation)
    weights = topk_weights.reshape(-1).float()
    tokens = torch.arange(T * k, device=x.device) // k
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    order = torch.argsort(ids, stable=True)
    ids, tokens, weights = ids[order], tokens[order], weights[order]
    counts = torch.bincount(ids.clamp(min=-1) + 1, minlength=w13.shape[0] + 1)[1:].tolist()
    start = int((ids < 0).sum())
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        rows = tokens[start:start + n]
        h = activation_and_mul(F.linear(x[rows], w13[expert]), activation)
        y = F.linear(h, w2[expert]).float() * weights[start:start + n, None]
        out.index_add_(0, rows, y)
        start += n
    return out.to(x.dtype)


def _dense_experts(x, w13, w2, topk_weights, ids, activation):
    """Every local expert on every token, each token's output weighted by the routing
    weights of the slots that chose that expert (zero otherwise): no host reads."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    weights = topk_weights.float()
    for expert in range(w13.shape[0]):
        w = (weights * (ids == expert)).sum(dim=1, keepdim=True)
        h = activation_and_mul(F.linear(x, w13[expert]), activation)
        out += F.linear(h, w2[expert]).float() * w
    return out.to(x.dtype)
