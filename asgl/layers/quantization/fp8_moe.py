"""FP8 expert weights for a fused-MoE layer (the `FusedMoEMethodBase` hook of layers/quant.py).

Parameters, per rank (E experts, H hidden, I intermediate per rank), by `Fp8Layout.weight`:

| weight  | w13_weight / w2_weight           | scales                                             |
| ------- | -------------------------------- | -------------------------------------------------- |
| dynamic | 16-bit, quantized on load        | made on load: w13_weight_scale [E, 2I], w2 [E, H]  |
| tensor  | FP8 [E, 2I, H] / [E, H, I]       | w13_weight_scale [E, 2] (gate, up), w2 [E]         |
| channel | FP8                              | w13_weight_scale [E, 2I, 1], w2_weight_scale [E, H, 1] |
| block   | FP8                              | w13_<scale_name> [E, 2I/bn, H/bk], w2 [E, H/bn, I/bk] |

Each parameter carries `quant_kind` (the layout) and the dims a MoE loader shards along
(`output_dim` / `input_dim` counted without the expert axis, as for the linear layers);
per-tensor scales are replicated. After loading, tensor and channel scales become row scales
like the linear method's. `apply` is the reference path: each chosen expert runs
`apply_fp8_rowwise` / `apply_fp8_block` on its tokens (W8A8 on an FP8 GPU, dequantized on the
CPU); a grouped Triton kernel can replace it without changing the parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asgl.layers.quant import FusedMoEMethodBase
from asgl.layers.quantization.base import Fp8Layout
from asgl.layers.quantization.fp8_kernels import (FP8, apply_fp8_block, apply_fp8_rowwise,
                                                  quantize_weight_per_channel)
from asgl.layers.utils import set_weight_attrs


def _param(layer: nn.Module, name: str, shape, dtype, attrs: dict) -> None:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(p, attrs)
    layer.register_parameter(name, p)


class Fp8MoEMethod(FusedMoEMethodBase):
    def __init__(self, layout: Fp8Layout):
        if layout.activation == "static":
            # a static input scale per expert would need the MoE loader to route it: later
            layout = Fp8Layout(layout.weight, "dynamic", layout.block, layout.scale_name,
                               layout.activation_ub)
        self.layout = layout

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition,
                       params_dtype, weight_loader):
        lay, E, H, I = self.layout, num_experts, hidden_size, intermediate_size_per_partition
        wdtype = params_dtype if lay.weight == "dynamic" else FP8
        base = {"weight_loader": weight_loader, "quant_kind": lay.weight}
        _param(layer, "w13_weight", (E, 2 * I, H), wdtype, {**base, "output_dim": 0,
                                                             "input_dim": 1})
        _param(layer, "w2_weight", (E, H, I), wdtype, {**base, "output_dim": 0, "input_dim": 1})
        if lay.weight == "tensor":
            _param(layer, "w13_weight_scale", (E, 2), torch.float32, base)
            _param(layer, "w2_weight_scale", (E,), torch.float32, base)
        elif lay.weight == "channel":
            _param(layer, "w13_weight_scale", (E, 2 * I, 1), torch.float32,
                   {**base, "output_dim": 0})
            _param(layer, "w2_weight_scale", (E, H, 1), torch.float32, {**base, "output_dim": 0})
        elif lay.weight == "block":
            bn, bk = lay.block
            packed = {**base, "output_dim": 0, "input_dim": 1, "packed_dim": 0,
                      "pack_factor": bn}
            _param(layer, f"w13_{lay.scale_name}", (E, -(-2 * I // bn), -(-H // bk)),
                   torch.float32, packed)
            _param(layer, f"w2_{lay.scale_name}", (E, -(-H // bn), -(-I // bk)),
                   torch.float32, packed)

    def process_weights_after_loading(self, layer):
        lay = self.layout
        if lay.weight == "dynamic":
            for name in ("w13", "w2"):
                w = getattr(layer, f"{name}_weight").data
                pairs = [quantize_weight_per_channel(w[e]) for e in range(w.shape[0])]
                setattr(layer, f"{name}_weight",
                        nn.Parameter(torch.stack([q for q, _ in pairs]), requires_grad=False))
                setattr(layer, f"{name}_weight_scale",
                        nn.Parameter(torch.stack([s for _, s in pairs]), requires_grad=False))
        elif lay.weight == "tensor":
            half = layer.w13_weight.shape[1] // 2
            w13 = layer.w13_weight_scale.data.repeat_interleave(half, dim=1)
            w2 = layer.w2_weight_scale.data[:, None].expand(-1, layer.w2_weight.shape[1])
            layer.w13_weight_scale = nn.Parameter(w13.contiguous(), requires_grad=False)
            layer.w2_weight_scale = nn.Parameter(w2.contiguous(), requires_grad=False)
        elif lay.weight == "channel":
            for name in ("w13_weight_scale", "w2_weight_scale"):
                s = getattr(layer, name).data
                setattr(layer, name, nn.Parameter(s.squeeze(-1).contiguous(),
                                                  requires_grad=False))

    def _expert(self, layer, which: str, e: int, x: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        w = getattr(layer, f"{which}_weight")[e]
        if lay.weight == "block":
            return apply_fp8_block(x, w, getattr(layer, f"{which}_{lay.scale_name}")[e],
                                   lay.block)
        return apply_fp8_rowwise(x, w, getattr(layer, f"{which}_weight_scale")[e], None, None,
                                 lay.activation_ub)

    def apply(self, layer, x, topk_weights, topk_ids):
        out = torch.zeros_like(x, dtype=torch.float32)
        flat = topk_ids.reshape(-1)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
        weights = topk_weights.reshape(-1).float()
        for e in torch.unique(flat).tolist():
            sel = (flat == e).nonzero().squeeze(1)
            tok = rows[sel]
            gate, up = self._expert(layer, "w13", e, x[tok]).chunk(2, dim=-1)
            y = self._expert(layer, "w2", e, F.silu(gate) * up)
            out.index_add_(0, tok, y.float() * weights[sel, None])
        return out.to(x.dtype)
