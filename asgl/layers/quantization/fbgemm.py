"""fbgemm FP8 checkpoints (`quant_method: fbgemm_fp8`, e.g. Llama-3.1-405B-Instruct-FP8):
FP8 `weight` with a per-channel `weight_scale` [N, 1]; activations quantized per token at
run time, their row maximum capped at `activation_scale_ub`; `modules_to_not_convert` stay
16-bit."""

from __future__ import annotations

from asgl.layers.quantization.base import Fp8Layout, QuantSpec
from asgl.layers.quantization.fp8 import Fp8Config


class FbgemmFp8Config(Fp8Config):
    name = "fbgemm_fp8"


def from_spec(spec: QuantSpec) -> Fp8Config:
    qc = spec.config
    ub = qc.get("activation_scale_ub")
    layout = Fp8Layout("channel", "dynamic", activation_ub=float(ub) if ub else None)
    return FbgemmFp8Config(layout, list(qc.get("modules_to_not_convert") or []))
