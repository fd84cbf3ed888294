"""Mixture-of-experts layer: router, expert weights, grouped GEMM dispatch.

How a model builds its MoE block (see asgl/models/moe.py for Mixtral / Qwen-MoE / OLMoE):

```python
from asgl.layers.moe import FusedMoE, MoEGate, RouterConfig, map_expert_weight

router = RouterConfig(top_k=8, renormalize=True)            # softmax, top-k, renormalize
# DeepSeek V3: RouterConfig(top_k=8, scoring="sigmoid", renormalize=True,
#     num_expert_group=8, topk_group=4, group_score="top2_sum",
#     routed_scaling_factor=2.5, use_correction_bias=True)
# DeepSeek V2: RouterConfig(top_k=6, renormalize=False, num_expert_group=8, topk_group=3,
#     group_score="max", routed_scaling_factor=16.0)     (V2-Lite: no groups, "greedy")
self.gate = MoEGate(H, E, float32=..., correction_bias=...)   # mlp.gate.weight [E, H]
self.experts = FusedMoE(E, H, moe_intermediate, router, reduce_results=False,
                        prefix=f"{prefix}.experts")
...
logits = self.gate(x)                                        # [T, E]
y = self.experts(x, logits, self.gate.e_score_correction_bias)   # [T, H], partial per rank
y = y + shared_expert(x)                                     # its down_proj not reduced either
y = tensor_model_parallel_all_reduce(y)                      # one all-reduce for both
```

Loading: in the model's `_map_weights`, `map_expert_weight(name)` (or with Mixtral's
`gate="w1", up="w3", down="w2"`) turns `...experts.<e>.gate_proj.weight` into
(`...experts.w13_weight`, (e, "gate")); yield that as (source, param name, tensor,
shard id) to `asgl.models.weights.assign_weights`, which calls `FusedMoE.weight_loader`.
Stacked checkpoints (DBRX, transformers 5 state dicts) pass shard id `(None, piece)` or
None. TP shards the intermediate dim; `ep_size` splits the experts (see fused_moe.py).

Modules: `router.py` (`RouterConfig`, `select_experts`), `gate.py` (`MoEGate`),
`fused_moe.py` (`FusedMoE`, `map_expert_weight`). Kernels: `asgl/kernels/moe_torch.py`
(torch reference, the CPU path) and `asgl/kernels/triton/fused_moe.py` (sort/align on the
device, grouped GEMMs; fp16/bf16 on CUDA).
"""

from asgl.layers.moe.fused_moe import FusedMoE, map_expert_weight
from asgl.layers.moe.gate import MoEGate
from asgl.layers.moe.router import RouterConfig, select_experts

__all__ = ["FusedMoE", "MoEGate", "RouterConfig", "map_expert_weight", "select_experts"]
