"""What the model runner does around a quantized model's weights: finish layers after
loading (dummy weights too), cast only the unquantized parameters to the model dtype, and
count what quantization saved (the KV pool gets it: the start-up log says how much)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from asgl.layers.quant import UnquantizedLinearMethod


def _quantized(module: nn.Module) -> bool:
    method = getattr(module, "quant_method", None)
    return method is not None and not isinstance(method, UnquantizedLinearMethod)


def process_after_loading(model: nn.Module) -> None:
    """Let every layer's quant method repack its weights (dummy weights skip the loader's
    own call in `assign_weights`; calling it twice would quantize twice)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


@torch.no_grad()
def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model.to(dtype)`, but FP8 weights and their float32 scales keep their dtypes (a
    plain `.to` would turn FP8 weights back into 16-bit ones), and so do parameters marked
    `keep_float32` (a router whose choices bf16 would change)."""
    for module in model.modules():
        keep = _quantized(module)
        for name, p in list(module._parameters.items()):
            if p is None or keep or not p.is_floating_point() or p.dtype == dtype \
                    or type(p.data) is not torch.Tensor or p.dtype.itemsize == 1 \
                    or getattr(p, "keep_float32", False):  # DeepSeek's router, its bias
                continue
            p.data = p.data.to(dtype)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype \
                    and b.dtype.itemsize != 1:
                module._buffers[name] = b.to(dtype)
    return model


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, tensor subclasses (torchao's) included: their inner tensors."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes the parameters take, bytes they would take unquantized in `dtype`)."""
    actual = unquantized = 0
    item = torch.empty((), dtype=dtype).element_size()
    for module in model.modules():
        own = [p for p in module._parameters.values() if p is not None]
        size = sum(tensor_bytes(p) for p in own)
        actual += size
        weight = module._parameters.get("weight")
        quantized = _quantized(module) or (weight is not None and type(weight.data) not in
                                           (torch.Tensor,) and not isinstance(module, nn.Embedding))
        if quantized and weight is not None:
            bias = module._parameters.get("bias")
            unquantized += weight.numel() * item + (tensor_bytes(bias) if bias is not None else 0)
        else:
            unquantized += size
    return actual, unquantized


def describe_savings(model: nn.Module, dtype: torch.dtype, scheme: Any) -> tuple[int, str]:
    """(weight bytes, a log fragment saying what quantization freed for the KV pool)."""
    actual, full = weight_bytes(model, dtype)
    if scheme is None or full <= actual:
        return actual, ""
    name = str(dtype).replace("torch.", "")
    unit, div = ("GiB", 2**30) if full >= 2**30 else ("MiB", 2**20)
    return actual, (f"; {scheme} weights {actual / div:.2f} {unit} instead of "
                    f"{full / div:.2f} {unit} in {name}: {(full - actual) / div:.2f} {unit} "
                    "more for the KV pool")
