"""What the quantization modules share, without torch: the error, the chosen scheme, and the
description of an FP8 layout (fp8.py's table)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class QuantizationError(ValueError):
    """A quantization method that cannot run; the message names it."""


@dataclass
class QuantSpec:
    """The scheme a model runs with: `name` (a key of SUPPORTED) and its config dict
    (the checkpoint's `quantization_config`, or {} for quantize-on-load)."""

    name: str
    config: dict = field(default_factory=dict)
    from_checkpoint: bool = False


@dataclass(frozen=True)
class Fp8Layout:
    """How a checkpoint stores an FP8 layer (see fp8.py)."""

    weight: str = "dynamic"  # dynamic | tensor | channel | block
    activation: str = "dynamic"  # dynamic | static
    block: Optional[tuple[int, int]] = None  # (bn, bk) for block weights
    scale_name: str = "weight_scale"  # block scales: weight_scale_inv (HF) or weight_scale
    activation_ub: Optional[float] = None  # fbgemm: activation amax clamped to this
