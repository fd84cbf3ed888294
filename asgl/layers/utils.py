"""Small helpers shared by the parallel layers and the models' weight loading."""

from __future__ import annotations

from typing import Any

import torch


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """`numerator // denominator`, refusing sizes that do not split evenly across ranks."""
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by the tensor-parallel size "
                         f"{denominator}")
    return numerator // denominator


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any] | None) -> None:
    """Attach loading metadata (`weight_loader`, `input_dim`, `output_dim`, ...) to a param."""
    for key, value in (attrs or {}).items():
        if hasattr(param, key):
            raise KeyError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)


def copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a checkpoint tensor into (a shard of) a parameter, with a clear shape error."""
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter "
                         f"(shard) of shape {tuple(dst.shape)}")
    dst.copy_(src)


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor,
                          shard_id: Any = None) -> None:
    """Loader for replicated parameters (norm weights, ...): copy the whole tensor."""
    if shard_id is not None:
        raise ValueError(f"a replicated parameter has no shard {shard_id!r}")
    with torch.no_grad():
        copy_weight(param.data, loaded_weight)
