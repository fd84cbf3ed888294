"""The quantization hook of the linear layers (and of fused-MoE expert weights).

A linear layer does not own its weight layout: it asks its `LinearMethodBase` to create the
parameters (`create_weights`) and to run the matmul (`apply`). FP8, INT4 (AWQ/GPTQ) and the
like are added as a `QuantizationConfig` that hands out their own methods, so models never
change. Parameters a method creates carry `input_dim` / `output_dim` (which axis the layer
shards along) and optionally `packed_dim` / `pack_factor` (several values per stored element),
and the `weight_loader` the layer passed in; the layer's loader does the TP narrowing.
Scales are parameters like any other: a per-channel scale carries `output_dim` (sharded with
its rows), a block scale `output_dim`/`input_dim` plus `packed_dim`/`pack_factor` (one value
per block of rows), a per-tensor scale neither (one value per fused piece, replicated).

The concrete schemes (FP8 layouts, torchao, the names of what is refused) live in
`asgl/layers/quantization/`; `get_quant_config` there picks one from `--quantization` and
the checkpoint's `quantization_config`.

MoE hook: a fused-MoE layer asks `quant_config.get_moe_method(layer, prefix)` for a
`FusedMoEMethodBase` (None: unquantized) and lets it create the stacked expert weights
`w13_weight` [E, 2I, H] / `w2_weight` [E, H, I] and their scales, post-process them after
loading, and run the experts (`apply`). Expert scales are per expert (a leading E axis) and
shard with their weights exactly as the linear layers' do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from asgl.layers.utils import set_weight_attrs


class LinearMethodBase(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, weight_loader: Callable) -> None:
        """Register this rank's parameters on `layer`. `output_partition_sizes` lists the
        per-rank widths of the fused outputs (one entry for plain layers, q/k/v for QKV)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`x @ W.T + bias` for this rank's shard."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack / transpose weights once every shard is loaded (the loader calls it)."""


class UnquantizedLinearMethod(LinearMethodBase):
    """Plain dense weight [out, in] in the model dtype."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, weight_loader):
        weight = nn.Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition,
                                          dtype=params_dtype), requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, "weight_loader": weight_loader})
        layer.register_parameter("weight", weight)

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)


class FusedMoEMethodBase(ABC):
    """How a fused-MoE layer stores and runs its experts (the hook for the MoE layer).

    `create_weights` registers `w13_weight` [E, 2 * I, H] (gate and up stacked) and
    `w2_weight` [E, H, I] for this rank (I = intermediate size per rank) plus any scales,
    each with the layer's `weight_loader`; `apply(layer, x, topk_weights, topk_ids)` returns
    the weighted sum of the chosen experts' outputs, [T, H] in x's dtype."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       weight_loader: Callable) -> None:
        ...

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        ...

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack / quantize the expert weights once every expert is loaded."""


class QuantizationConfig(ABC):
    """A checkpoint's quantization scheme; `get_quant_method` picks the method per layer."""

    name: str = "none"

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> Optional[LinearMethodBase]:
        """The method for the layer named `prefix` (None: leave it unquantized)."""

    def get_moe_method(self, layer: nn.Module, prefix: str) -> Optional[FusedMoEMethodBase]:
        """The method for the fused-MoE layer named `prefix` (None: unquantized experts).
        A scheme that cannot run experts raises NotImplementedError naming itself."""
        raise NotImplementedError(f"quantization {self.name!r} has no fused-MoE method yet")


def get_linear_method(quant_config: Optional[QuantizationConfig], layer: nn.Module,
                      prefix: str) -> LinearMethodBase:
    method = quant_config.get_quant_method(layer, prefix) if quant_config is not None else None
    return method or UnquantizedLinearMethod()
