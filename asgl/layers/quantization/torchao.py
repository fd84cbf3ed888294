"""`--torchao-config`: quantize the loaded model's linear layers with the torchao library, as
SGLang does. Values: int4wo-<group> (int4 weights, groups of <group> columns; 32, 64, 128,
256; CUDA and bf16 only: tinygemm's packing), int8wo (int8 weights), int8dq (int8 weights and dynamic int8 activations), fp8wo (FP8
weights), fp8dq (FP8 weights and dynamic per-row FP8 activations; sm89+).

torchao swaps each 16-bit weight for one of its tensor subclasses, whose F.linear runs its
kernels; our layers call F.linear through UnquantizedLinearMethod, so they need no change.
Layers already quantized by a checkpoint scheme are left alone (--quantization with
--torchao-config is refused at start-up). torchao is an optional dependency
(`pip install torchao`): without it the flag fails at start-up saying so.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

from asgl.layers.quantization.base import QuantizationError

logger = logging.getLogger(__name__)

CHOICES = ("int4wo-<group>", "int8wo", "int8dq", "fp8wo", "fp8dq")
_INT4 = re.compile(r"^int4wo-(\d+)$")


def check_torchao_config(value: Optional[str], quantization: Optional[str] = None) -> None:
    """The flag's value alone (no torch, no torchao import): preflight."""
    if value is None:
        return
    m = _INT4.match(value)
    if m is not None:
        if int(m.group(1)) not in (32, 64, 128, 256):
            raise QuantizationError(f"--torchao-config {value}: the group size must be 32, 64, "
                                    "128 or 256")
    elif value not in CHOICES:
        raise QuantizationError(f"unknown --torchao-config {value!r} (known: "
                                f"{', '.join(CHOICES)})")
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise QuantizationError(f"--torchao-config {value} needs the torchao library, which is "
                                "not installed: pip install torchao")
    if quantization is not None:
        raise QuantizationError(f"--torchao-config {value} quantizes a 16-bit model: it "
                                f"cannot be combined with the {quantization} quantization")


def _config(value: str, device_type: str) -> Any:
    try:
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                          Float8WeightOnlyConfig,
                                          Int4WeightOnlyConfig,
                                          Int8DynamicActivationInt8WeightConfig,
                                          Int8WeightOnlyConfig, PerRow)
    except ImportError as exc:
        raise QuantizationError(f"--torchao-config {value} needs the torchao library, which "
                                f"is missing or broken ({exc}): pip install torchao") from exc
    m = _INT4.match(value)
    if m is not None:
        group = int(m.group(1))
        if device_type != "cuda":
            raise QuantizationError(f"--torchao-config {value} runs on CUDA only (torchao has "
                                    "no CPU int4 kernel); on the CPU use int8wo or int8dq")
        # tinygemm's layout (torch's own _weight_int4pack_mm): bf16, no extra kernels library
        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
    return {"int8wo": Int8WeightOnlyConfig, "int8dq": Int8DynamicActivationInt8WeightConfig,
            "fp8wo": Float8WeightOnlyConfig,
            "fp8dq": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            }[value]()


def apply_torchao(model: Any, value: str, device_type: str) -> int:
    """Quantize every unquantized linear layer of `model` in place; returns how many."""
    config = _config(value, device_type)
    from torchao.quantization import quantize_

    from asgl.layers.linear import LinearBase
    from asgl.layers.quant import UnquantizedLinearMethod

    count = 0

    def wanted(module: Any, fqn: str) -> bool:
        nonlocal count
        ok = isinstance(module, LinearBase) and \
            isinstance(module.quant_method, UnquantizedLinearMethod)
        count += ok
        return ok

    try:
        quantize_(model, config, filter_fn=wanted)
    except Exception as exc:  # noqa: BLE001 - torchao's own errors, e.g. a device it lacks
        raise QuantizationError(f"--torchao-config {value} failed on {device_type}: "
                                f"{type(exc).__name__}: {exc}") from exc
    logger.info("torchao %s applied to %d linear layers", value, count)
    return count
