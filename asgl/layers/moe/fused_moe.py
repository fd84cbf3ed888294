"""`FusedMoE`: the routed experts of one MoE layer, all in two stacked weights.

Parameters (this rank's part):

- `w13_weight` [E_local, 2 * I_local, H]: each expert's gate rows, then its up rows
  (the layout of HF transformers 5's `experts.gate_up_proj`);
- `w2_weight`  [E_local, H, I_local]: each expert's down projection.

Sharding (`asgl.distributed` TP group of size tp, `ep_size` dividing it): the experts are
split into `ep_size` contiguous ranges and, inside each range's `tp / ep_size` ranks, the
intermediate dimension is split (Megatron-style, like the dense MLP). So ep_size=1 (the
default) is pure TP: every rank holds every expert's slice. Every rank computes a partial
sum of the output (its experts, its intermediate slice); one all-reduce over the TP group
finishes it (`reduce_results`; a model that adds a shared expert first can defer it).

Loading: `weight_loader(param, tensor, shard_id)` takes the unsharded checkpoint tensor
and keeps this rank's part. `shard_id` is

- `(expert, piece)`: one expert's tensor; piece "gate" / "up" ([I, H]), "gate_up"
  ([2I, H], gate first) or "down" ([H, I]); experts of other EP ranks are skipped;
- `(None, piece)`: the same pieces for all experts at once, with a leading [E] axis;
- `None`: the whole stacked tensor, [E, 2I, H] or [E, H, I] (dummy weights under TP).

`map_expert_weight` turns HF per-expert names (`...experts.3.gate_proj.weight`, names
configurable: Mixtral's w1/w3/w2) and transformers 5's stacked names
(`...experts.gate_up_proj`) into (parameter name, shard id) for `assign_weights`. After
loading, a layer that got some but not all of its experts' pieces raises.

Forward: `forward(x [T, H], router_logits [T, E], correction_bias=None) -> [T, H]`
selects experts (`router.select_experts`) and runs them: the Triton grouped GEMM
(`asgl/kernels/triton/fused_moe.py`) for fp16/bf16 on CUDA (`layers/fused.use_fused`),
the torch reference (`asgl/kernels/moe_torch.py`) otherwise. `run_experts(x, weights,
ids)` skips the router, for callers that route themselves.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn

from asgl.distributed import get_tp_rank, get_tp_size, tensor_model_parallel_all_reduce
from asgl.layers.fused import use_fused
from asgl.layers.moe.router import RouterConfig, select_experts
from asgl.layers.utils import copy_weight, divide

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_PIECES = ("gate", "up", "gate_up", "down")


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 router: RouterConfig, *, activation: str = "silu", reduce_results: bool = True,
                 ep_size: int = 1, params_dtype: Optional[torch.dtype] = None, prefix: str = ""):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MoE activation {activation!r} is not one of {ACTIVATIONS}")
        tp, rank = get_tp_size(), get_tp_rank()
        if tp % ep_size:
            raise ValueError(f"--ep-size {ep_size} does not divide the tensor-parallel size {tp}")
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_size = intermediate_size  # per expert, unsharded
        self.router, self.activation, self.reduce_results = router, activation, reduce_results
        self.prefix = prefix
        self.ep_size, self.ep_rank = ep_size, rank // (tp // ep_size)
        self.moe_tp_size, self.moe_tp_rank = tp // ep_size, rank % (tp // ep_size)
        self.num_local_experts = divide(num_experts, ep_size, "number of experts")
        self.expert_start = self.ep_rank * self.num_local_experts
        self.intermediate_per_rank = divide(intermediate_size, self.moe_tp_size,
                                            "MoE intermediate size")
        dtype = params_dtype or torch.get_default_dtype()
        E, I, H = self.num_local_experts, self.intermediate_per_rank, hidden_size
        self.w13_weight = nn.Parameter(torch.empty(E, 2 * I, H, dtype=dtype), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(E, H, I, dtype=dtype), requires_grad=False)
        for p in (self.w13_weight, self.w2_weight):
            p.weight_loader = self.weight_loader
        if ep_size > 1:  # global expert id -> local id, -1 for another rank's expert
            ids = torch.full((num_experts,), -1, dtype=torch.int32)
            ids[self.expert_start:self.expert_start + E] = torch.arange(E, dtype=torch.int32)
            self.register_buffer("expert_map", ids, persistent=False)
        else:
            self.expert_map = None
        self.quant_method = _LoadCheck()
        self._loaded: set[tuple[int, str]] = set()  # (expert, piece) loaded

    # ------------------------------------------------------------------ loading
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Any = None) -> None:
        which = "w13" if param is self.w13_weight else "w2"
        if shard_id is None:  # the stacked tensor of every expert
            if which == "w13":
                I = self.intermediate_size
                self.weight_loader(param, loaded_weight[:, :I], (None, "gate"))
                self.weight_loader(param, loaded_weight[:, I:], (None, "up"))
            else:
                self.weight_loader(param, loaded_weight, (None, "down"))
            return
        expert, piece = shard_id
        if piece not in _PIECES:
            raise ValueError(f"{self.prefix}: unknown expert piece {piece!r}")
        if (piece == "down") != (which == "w2"):
            raise ValueError(f"{self.prefix}: piece {piece!r} does not belong in {which}")
        if expert is None:
            if loaded_weight.shape[0] != self.num_experts:
                raise ValueError(f"{self.prefix}: stacked {piece} has {loaded_weight.shape[0]} "
                                 f"experts, the config {self.num_experts}")
            local = loaded_weight[self.expert_start:self.expert_start + self.num_local_experts]
            for i in range(self.num_local_experts):
                self._load_expert(param, local[i], self.expert_start + i, piece)
            return
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"{self.prefix}: expert {expert} out of range "
                             f"(num_experts {self.num_experts})")
        local_id = expert - self.expert_start
        if 0 <= local_id < self.num_local_experts:  # else: another EP rank's expert
            self._load_expert(param, loaded_weight, expert, piece)

    def _load_expert(self, param: nn.Parameter, w: torch.Tensor, expert: int, piece: str) -> None:
        I, r = self.intermediate_per_rank, self.moe_tp_rank
        full, H = self.intermediate_size, self.hidden_size
        want = {"down": (H, full), "gate_up": (2 * full, H)}.get(piece, (full, H))
        if tuple(w.shape) != want:
            raise ValueError(f"{self.prefix}: expert {expert} {piece} tensor of shape "
                             f"{tuple(w.shape)} does not fit the config's {want}")
        dst = param.data[expert - self.expert_start]
        with torch.no_grad():
            if piece == "down":  # [H, I]: this rank's columns
                copy_weight(dst, w.narrow(1, r * I, I))
            elif piece == "gate_up":  # [2I, H]: this rank's rows of each half
                copy_weight(dst[:I], w.narrow(0, r * I, I))
                copy_weight(dst[I:], w.narrow(0, full + r * I, I))
            else:
                rows = dst[:I] if piece == "gate" else dst[I:]
                copy_weight(rows, w.narrow(0, r * I, I))
        pieces = ("gate", "up") if piece == "gate_up" else (piece,)
        self._loaded.update((expert, p) for p in pieces)

    def check_loaded(self) -> None:
        """Every local expert's gate, up and down came from the checkpoint (if any did)."""
        if not self._loaded:
            return
        want = {(self.expert_start + i, p) for i in range(self.num_local_experts)
                for p in ("gate", "up", "down")}
        missing = sorted(want - self._loaded)
        if missing:
            raise ValueError(f"{self.prefix}: checkpoint lacks {len(missing)} expert tensors, "
                             f"e.g. (expert, piece) {missing[:4]}")
        self._loaded.clear()

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                correction_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        r = self.router
        if (use_fused(hidden_states) and r.num_expert_group is None and r.norm_p == 1.0
                and router_logits.is_cuda):
            from asgl.kernels.triton.moe_topk import fused_topk  # one launch at decode
            weights, ids = fused_topk(
                router_logits.contiguous(), r.top_k, sigmoid=r.scoring == "sigmoid",
                renormalize=r.renormalize, scale=r.routed_scaling_factor,
                correction_bias=correction_bias if r.use_correction_bias else None)
        else:
            weights, ids = select_experts(router_logits, r, correction_bias)
        return self.run_experts(hidden_states, weights, ids)

    def run_experts(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights [T, k] (float32), global expert ids [T, k] -> [T, H]."""
        if use_fused(hidden_states):
            from asgl.kernels.triton.fused_moe import fused_experts
        else:
            from asgl.kernels.moe_torch import fused_experts_ref as fused_experts
        out = fused_experts(hidden_states, self.w13_weight, self.w2_weight, topk_weights,
                            topk_ids, activation=self.activation, expert_map=self.expert_map)
        if self.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        return out

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts} (local {self.num_local_experts}), "
                f"hidden={self.hidden_size}, intermediate={self.intermediate_size} "
                f"(per rank {self.intermediate_per_rank}), top_k={self.router.top_k}, "
                f"ep={self.ep_size}")


class _LoadCheck:
    """The hook `assign_weights` calls after loading (the linear layers' quant-method
    slot): an unquantized MoE layer only checks that no expert was left half loaded.
    Quantized expert weights (fp8 per expert) would plug in here."""

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        layer.check_loaded()


def map_expert_weight(name: str, gate: str = "gate_proj", up: str = "up_proj",
                      down: str = "down_proj", experts: str = "experts"
                      ) -> Optional[tuple[str, Any]]:
    """An HF expert tensor name -> (FusedMoE parameter name, shard id), None for others.

    `model.layers.0.mlp.experts.3.gate_proj.weight` -> (`model.layers.0.mlp.experts.w13_weight`,
    (3, "gate")); `...experts.gate_up_proj` / `...experts.down_proj` (transformers 5's
    stacked tensors) -> (`...w13_weight` / `...w2_weight`, None); `...experts.up_proj.weight`
    (one projection of all experts, [E, I, H], as GGUF conversions write it) ->
    (`...w13_weight`, (None, "up"))."""
    match = re.search(rf"\.{experts}\.(\d+)\.({gate}|{up}|{down})\.weight$", name)
    base = name[:match.start()] if match else None
    if match:
        piece = {gate: "gate", up: "up", down: "down"}[match.group(2)]
        param = "w2_weight" if piece == "down" else "w13_weight"
        return f"{base}.{experts}.{param}", (int(match.group(1)), piece)
    for stacked, param in (("gate_up_proj", "w13_weight"), ("down_proj", "w2_weight")):
        if name.endswith(f".{experts}.{stacked}"):
            return f"{name[:-len(stacked)]}{param}", None
    match = re.search(rf"\.{experts}\.({gate}|{up}|{down})\.weight$", name)
    if match:  # one projection of every expert, stacked (GGUF conversions)
        piece = {gate: "gate", up: "up", down: "down"}[match.group(1)]
        param = "w2_weight" if piece == "down" else "w13_weight"
        return f"{name[:match.start()]}.{experts}.{param}", (None, piece)
    return None
