"""FP8 e4m3 weights: one linear method for every FP8 layout, and the `fp8` scheme.

`Fp8Layout` says how a checkpoint stores a layer (the other FP8 schemes, modelopt.py,
fbgemm.py and compressed_tensors.py, only map their configs to a layout):

| weight   | stored                                      | scale parameter                     |
| -------- | ------------------------------------------- | ----------------------------------- |
| dynamic  | 16/32-bit, quantized per channel on load    | (made on load) weight_scale [N]     |
| tensor   | FP8                                         | weight_scale, one per fused piece   |
| channel  | FP8                                         | weight_scale [N, 1]                 |
| block    | FP8                                         | `scale_name` [N / bn, K / bk]       |

Activations: "dynamic" (per token; per token and bk group for blocks) or "static" (the
checkpoint's `input_scale`, one per piece; the layer uses their max).

After loading, tensor and channel scales become one float32 row scale per output row, so
every non-block layer runs the same row-wise GEMM (fp8_kernels.py). Tensor parallelism:
channel and block scales carry `output_dim` (block ones `input_dim` and a pack factor of
bn too) and shard with their rows and columns; per-tensor scales are replicated.

The `fp8` scheme (HF / vLLM `quant_method: fp8`): `--quantization fp8` on a 16-bit
checkpoint (dynamic), a checkpoint with `activation_scheme` static|dynamic and per-tensor
`weight_scale`, or one with `weight_block_size` [bn, bk] and `weight_scale_inv`
(DeepSeek V3). `ignored_layers` / `modules_to_not_convert` stay unquantized.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Optional

import torch
from torch import nn

from asgl.layers.quant import (FusedMoEMethodBase, LinearMethodBase, QuantizationConfig,
                               UnquantizedLinearMethod)
from asgl.layers.quantization.base import Fp8Layout, QuantizationError, QuantSpec
from asgl.layers.quantization.fp8_kernels import (FP8, apply_fp8_block, apply_fp8_rowwise,
                                                  dequantize_block, dequantize_rowwise,
                                                  quantize_weight_per_channel)
from asgl.layers.utils import set_weight_attrs

# Our fused layers and the checkpoint pieces they hold (ignore lists name the pieces).
_FUSED_PIECES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                 "gate_up_proj": ("gate_proj", "up_proj")}


def _param(shape, dtype, attrs: dict) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(p, attrs)
    return p


def _scalar_loader(layer_loader: Callable) -> Callable:
    """Per-tensor scales come as [] or [1]; a one-piece layer's parameter is [1]."""
    def load(param, loaded, shard_id=None):
        if shard_id is None and loaded.numel() == param.numel():
            loaded = loaded.reshape(param.shape)
        return layer_loader(param, loaded.float(), shard_id) if shard_id is not None \
            else layer_loader(param, loaded.float())
    return load


class Fp8LinearMethod(LinearMethodBase):
    def __init__(self, layout: Fp8Layout):
        self.layout = layout

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes,
                       input_size, output_size, params_dtype, weight_loader):
        lay = self.layout
        n, k = sum(output_partition_sizes), input_size_per_partition
        layer.fp8_piece_sizes = list(output_partition_sizes)
        layer.fp8_orig_dtype = params_dtype
        wdtype = params_dtype if lay.weight == "dynamic" else FP8
        layer.register_parameter("weight", _param((n, k), wdtype, {
            "input_dim": 1, "output_dim": 0, "weight_loader": weight_loader}))
        pieces = len(output_partition_sizes)
        if lay.weight == "tensor":
            layer.register_parameter("weight_scale", _param(
                (pieces,), torch.float32, {"weight_loader": _scalar_loader(weight_loader)}))
        elif lay.weight == "channel":
            layer.register_parameter("weight_scale", _param(
                (n, 1), torch.float32, {"output_dim": 0, "weight_loader": weight_loader}))
        elif lay.weight == "block":
            bn, bk = lay.block
            if pieces > 1 and any(s % bn for s in output_partition_sizes):
                raise QuantizationError(
                    f"block-wise FP8: fused pieces {output_partition_sizes} of "
                    f"{getattr(layer, 'prefix', '?')} are not multiples of the block {bn}")
            if k != input_size and k % bk:
                raise QuantizationError(f"block-wise FP8: the per-rank input size {k} is not "
                                        f"a multiple of the block {bk}")
            if pieces == 1 and n != output_size and n % bn:
                raise QuantizationError(f"block-wise FP8: the per-rank output size {n} is "
                                        f"not a multiple of the block {bn}")
            rows = sum(-(-s // bn) for s in output_partition_sizes)
            layer.register_parameter(lay.scale_name, _param(
                (rows, -(-k // bk)), torch.float32,
                {"output_dim": 0, "input_dim": 1, "packed_dim": 0, "pack_factor": bn,
                 "weight_loader": weight_loader}))
        elif lay.weight != "dynamic":
            raise ValueError(f"unknown FP8 weight layout {lay.weight!r}")
        if lay.activation == "static":
            layer.register_parameter("input_scale", _param(
                (pieces,), torch.float32, {"weight_loader": _scalar_loader(weight_loader)}))

    def process_weights_after_loading(self, layer):
        lay = self.layout
        if lay.weight == "dynamic":
            q, scale = quantize_weight_per_channel(layer.weight.data)
            layer.weight = nn.Parameter(q, requires_grad=False)
            layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        elif lay.weight == "tensor":
            sizes = torch.tensor(layer.fp8_piece_sizes, device=layer.weight.device)
            rows = layer.weight_scale.data.repeat_interleave(sizes)
            layer.weight_scale = nn.Parameter(rows.contiguous(), requires_grad=False)
        elif lay.weight == "channel":
            layer.weight_scale = nn.Parameter(layer.weight_scale.data.reshape(-1).contiguous(),
                                              requires_grad=False)
        if lay.activation == "static":
            # one quantization of the input feeds every piece: the largest scale covers all
            layer.input_scale = nn.Parameter(layer.input_scale.data.max().reshape(1),
                                             requires_grad=False)
        else:
            layer.register_parameter("input_scale", None)

    def apply(self, layer, x, bias=None):
        lay = self.layout
        if lay.weight == "block":
            return apply_fp8_block(x, layer.weight, getattr(layer, lay.scale_name), lay.block,
                                   bias)
        return apply_fp8_rowwise(x, layer.weight, layer.weight_scale, layer.input_scale, bias,
                                 lay.activation_ub)

    def dequantized_weight(self, layer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with, as `dtype` (tests, torchao, debugging)."""
        lay = self.layout
        if lay.weight == "block":
            return dequantize_block(layer.weight, getattr(layer, lay.scale_name), lay.block,
                                    dtype)
        return dequantize_rowwise(layer.weight, layer.weight_scale, dtype)


def is_ignored(name: str, patterns: list[str]) -> bool:
    """`name` (an HF module name) is in a checkpoint's list of unquantized modules: exact or
    dotted-suffix names, shell wildcards (ModelOpt) or `re:` regexes (compressed-tensors)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif any(c in p for c in "*?["):
            if fnmatch.fnmatch(name, p):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def layer_is_ignored(prefix: str, patterns: list[str]) -> bool:
    """Whether the (maybe fused) layer `prefix` stays unquantized; a fused layer whose
    pieces disagree cannot be one GEMM and is refused."""
    if not patterns:
        return False
    head, _, last = prefix.rpartition(".")
    names = [f"{head}.{p}" if head else p for p in _FUSED_PIECES.get(last, (last,))]
    flags = [is_ignored(n, patterns) for n in names]
    if any(flags) and not all(flags):
        raise QuantizationError(f"{prefix}: the checkpoint quantizes only some of "
                                f"{', '.join(names)}; a fused layer needs all or none")
    return all(flags)


class Fp8Config(QuantizationConfig):
    name = "fp8"

    def __init__(self, layout: Fp8Layout, ignored: Optional[list[str]] = None):
        self.layout = layout
        self.ignored = list(ignored or [])

    def get_quant_method(self, layer: nn.Module, prefix: str) -> Optional[LinearMethodBase]:
        if layer_is_ignored(prefix, self.ignored):
            return UnquantizedLinearMethod()
        return Fp8LinearMethod(self.layout)

    def get_moe_method(self, layer: nn.Module, prefix: str) -> Optional[FusedMoEMethodBase]:
        from asgl.layers.quantization.fp8_moe import Fp8MoEMethod

        if is_ignored(prefix, self.ignored):
            return None
        return Fp8MoEMethod(self.layout)


def from_spec(spec: QuantSpec) -> Fp8Config:
    qc = spec.config
    if not spec.from_checkpoint:
        return Fp8Config(Fp8Layout("dynamic", "dynamic"))
    ignored = list(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or [])
    act = str(qc.get("activation_scheme", "dynamic"))
    if act not in ("dynamic", "static"):
        raise QuantizationError(f"fp8 checkpoint: activation_scheme {act!r} is neither "
                                "dynamic nor static")
    block = qc.get("weight_block_size")
    if block:
        if act != "dynamic":
            raise QuantizationError("fp8 checkpoint: block-wise weights need dynamic "
                                    "activations (activation_scheme static given)")
        return Fp8Config(Fp8Layout("block", "dynamic", (int(block[0]), int(block[1])),
                                   "weight_scale_inv"), ignored)
    return Fp8Config(Fp8Layout("tensor", act), ignored)
