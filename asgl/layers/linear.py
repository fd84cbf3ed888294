"""Linear layers that shard their weights over the tensor-parallel ranks (Megatron style).

- `ReplicatedLinear`: full weight on every rank.
- `ColumnParallelLinear`: output features split over ranks; the output stays split unless
  `gather_output`.
- `MergedColumnParallelLinear`: several column layers fused into one matmul (gate_up).
- `QKVParallelLinear`: fused q/k/v; KV heads are split over ranks, or replicated when there
  are fewer KV heads than ranks.
- `RowParallelLinear`: input features split; partial outputs summed with an all-reduce.

Every parameter carries `weight_loader(param, loaded_weight, shard_id=None)` that takes the
full checkpoint tensor and copies this rank's slice into it; fused layers take the name of
the piece as `shard_id` (0/1 for gate/up, "q"/"k"/"v"), or the whole fused tensor when
`shard_id` is None. The matmul itself belongs to the layer's quant method (layers/quant.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from asgl.distributed import (get_tp_rank, get_tp_size, tensor_model_parallel_all_gather,
                              tensor_model_parallel_all_reduce)
from asgl.layers.quant import LinearMethodBase, QuantizationConfig, get_linear_method
from asgl.layers.utils import copy_weight, divide, set_weight_attrs


def _packed(param: torch.Tensor, dim: int, size: int) -> int:
    """A size along `dim` in stored elements (INT4 methods pack several values per element)."""
    if getattr(param, "packed_dim", None) == dim:
        return size // param.pack_factor
    return size


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, *, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None,
                 quant_method: LinearMethodBase | None = None, prefix: str = ""):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.prefix = prefix
        self.quant_method = quant_method or get_linear_method(quant_config, self, prefix)

    def _create(self, input_per_rank: int, output_sizes: list[int], bias: bool) -> None:
        self.quant_method.create_weights(self, input_per_rank, output_sizes, self.input_size,
                                         self.output_size, self.params_dtype, self.weight_loader)
        if bias:
            self.bias = nn.Parameter(torch.empty(sum(output_sizes), dtype=self.params_dtype),
                                     requires_grad=False)
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Any = None) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp={self.tp_size}"


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = True, **kw):
        super().__init__(input_size, output_size, **kw)
        self._create(input_size, [output_size], bias)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        copy_weight(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = False, **kw):
        super().__init__(input_size, output_size, **kw)
        self.gather_output = gather_output
        sizes = self._partition_sizes()
        self.output_size_per_partition = sum(sizes)
        self._create(input_size, sizes, bias)

    def _partition_sizes(self) -> list[int]:
        """This rank's output widths, one per fused piece."""
        return [divide(self.output_size, self.tp_size, "output size")]

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shard {shard_id!r}")
        dim = getattr(param, "output_dim", None)
        if dim is not None:
            size = param.shape[dim]
            loaded_weight = loaded_weight.narrow(dim, self.tp_rank * size, size)
        copy_weight(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias)
        return tensor_model_parallel_all_gather(out) if self.gather_output else out


class _FusedColumnLinear(ColumnParallelLinear):
    """Column layer made of named pieces. Subclasses fill `_shards` {id: (offset, size,
    source_rank)} in per-rank output units and `_checkpoint_sizes` [(id, full size)]."""

    _shards: dict[Any, tuple[int, int, int]]
    _checkpoint_sizes: list[tuple[Any, int]]

    def weight_loader(self, param, loaded_weight, shard_id=None):
        dim = getattr(param, "output_dim", None)
        if shard_id is None:  # a checkpoint that already stores the fused tensor
            if dim is None:
                return copy_weight(param.data, loaded_weight)
            start = 0
            for sid, total in self._checkpoint_sizes:
                total = _packed(param, dim, total)
                self.weight_loader(param, loaded_weight.narrow(dim, start, total), sid)
                start += total
            return
        if shard_id not in self._shards:
            raise ValueError(f"{type(self).__name__} has no shard {shard_id!r}")
        offset, size, src_rank = self._shards[shard_id]
        if dim is None:
            if param.numel() == len(self._shards):  # one value per piece (per-tensor scales)
                index = list(self._shards).index(shard_id)
                return copy_weight(param.data[index], loaded_weight.reshape(()))
            return copy_weight(param.data, loaded_weight)
        offset, size = _packed(param, dim, offset), _packed(param, dim, size)
        copy_weight(param.data.narrow(dim, offset, size),
                    loaded_weight.narrow(dim, src_rank * size, size))


class MergedColumnParallelLinear(_FusedColumnLinear):
    """Pieces of widths `output_sizes` (e.g. [intermediate, intermediate] for gate_up), each
    split over the ranks; shard ids are the piece indices."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True, **kw):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, **kw)

    def _partition_sizes(self) -> list[int]:
        tp, rank = get_tp_size(), get_tp_rank()
        sizes = [divide(s, tp, "output size") for s in self.output_sizes]
        self._shards = {i: (sum(sizes[:i]), s, rank) for i, s in enumerate(sizes)}
        self._checkpoint_sizes = list(enumerate(self.output_sizes))
        return sizes


class QKVParallelLinear(_FusedColumnLinear):
    """Fused q/k/v projection. Query heads are split over the ranks; KV heads too when there
    are at least as many as ranks, otherwise each rank keeps one KV head (replicated
    `tp_size // total_num_kv_heads` times)."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = True, **kw):
        tp = get_tp_size()
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.num_heads = divide(total_num_heads, tp, "number of attention heads")
        if tp >= self.total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp, self.total_num_kv_heads, "tp size over KV heads")
        else:
            self.num_kv_heads = divide(self.total_num_kv_heads, tp, "number of KV heads")
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_size  # per rank
        self.kv_size = self.num_kv_heads * head_size
        output_size = (total_num_heads + 2 * self.total_num_kv_heads) * head_size
        super().__init__(hidden_size, output_size, bias, **kw)

    def _partition_sizes(self) -> list[int]:
        rank = get_tp_rank()
        kv_rank = rank // self.num_kv_head_replicas
        q, kv = self.q_size, self.kv_size
        self._shards = {"q": (0, q, rank), "k": (q, kv, kv_rank), "v": (q + kv, kv, kv_rank)}
        total_kv = self.total_num_kv_heads * self.head_size
        self._checkpoint_sizes = [("q", self.total_num_heads * self.head_size), ("k", total_kv),
                                  ("v", total_kv)]
        return [q, kv, kv]


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 input_is_parallel: bool = True, reduce_results: bool = True, **kw):
        super().__init__(input_size, output_size, **kw)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.input_size_per_partition = divide(input_size, self.tp_size, "input size")
        self._create(self.input_size_per_partition, [output_size], bias)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if shard_id is not None:
            raise ValueError(f"RowParallelLinear has no shard {shard_id!r}")
        dim = getattr(param, "input_dim", None)
        if dim is not None:
            size = param.shape[dim]
            loaded_weight = loaded_weight.narrow(dim, self.tp_rank * size, size)
        copy_weight(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.tp_size > 1:
            x = x.chunk(self.tp_size, dim=-1)[self.tp_rank].contiguous()
        # The bias is added once, on rank 0, so the all-reduce does not count it tp times.
        bias = self.bias if self.tp_rank == 0 else None
        out = self.quant_method.apply(self, x, bias)
        return tensor_model_parallel_all_reduce(out) if self.reduce_results else out
