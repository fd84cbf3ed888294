"""Filling a model's parameters from checkpoint tensors, shared by every model family.

A model's `load_weights` maps each checkpoint tensor to (its parameter name, shard id) and
hands the stream here; this checks that every tensor has a parameter and every parameter
was filled, then lets quantization methods post-process their layers.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from asgl.layers.utils import default_weight_loader


def assign_weights(model: nn.Module,
                   mapped: Iterable[tuple[str, str, torch.Tensor, Optional[Any]]]) -> None:
    """`mapped` yields (checkpoint name, parameter name, tensor, shard id or None)."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for source, name, tensor, shard_id in mapped:
        if name not in params:
            raise ValueError(f"checkpoint tensor {source!r} has no parameter in "
                             f"{type(model).__name__}")
        param = params[name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        if shard_id is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard_id)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:5]}")
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model.to(dtype)`, except parameters marked `keep_float32` (DeepSeek's router weight
    and expert correction bias: bf16 would change which experts are chosen)."""
    keep = [(p, p.data) for p in model.parameters() if getattr(p, "keep_float32", False)]
    model.to(dtype)
    for p, data in keep:
        p.data = data
    return model
