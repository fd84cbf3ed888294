"""NVIDIA ModelOpt FP8 checkpoints (`quant_method: modelopt`, `quant_algo: FP8`, in
config.json or hf_quant_config.json): FP8 `weight` with a per-tensor `weight_scale` and a
static per-tensor `input_scale` per layer; `exclude_modules` (or `ignore`) stay 16-bit;
`k_proj.k_scale` / `v_proj.v_scale` are the FP8 KV-cache scales (kv_scales.py)."""

from __future__ import annotations

from asgl.layers.quantization.base import Fp8Layout, QuantSpec
from asgl.layers.quantization.fp8 import Fp8Config


class ModelOptFp8Config(Fp8Config):
    name = "modelopt"


def from_spec(spec: QuantSpec) -> Fp8Config:
    qc = spec.config
    ignored = list(qc.get("exclude_modules") or qc.get("ignore") or [])
    return ModelOptFp8Config(Fp8Layout("tensor", "static"), ignored)
