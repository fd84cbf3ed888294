"""Quantization schemes: which one a model runs with, checked before any weight is read.

`resolve_quantization(flag, checkpoint_config)` turns `--quantization` and the checkpoint's
`quantization_config` (config.json, or ModelOpt's hf_quant_config.json) into a `QuantSpec`
(the scheme's name and its config dict), or raises `QuantizationError` naming what cannot
run. It is plain dict work with no torch import, so `asgl serve`'s preflight and the loader
(`resolve_model`, which reads metadata only) both refuse a bad method before any weight loads.
`get_quant_config(spec)` then builds the scheme's `QuantizationConfig` (layers/quant.py),
importing its module only then.

One file per scheme:
- fp8.py: FP8 e4m3 weights (`--quantization fp8` on a 16-bit checkpoint: per-channel
  weight scales, dynamic per-token activation scales) and the HF/vLLM `fp8` checkpoints
  (per-tensor scales, or 128x128 blocks with `weight_scale_inv`, DeepSeek V3 style);
- modelopt.py (NVIDIA ModelOpt FP8), fbgemm.py (`fbgemm_fp8`), compressed_tensors.py
  (llmcompressor's `float-quantized`): other FP8 checkpoint layouts, same method;
- base.py: QuantizationError, QuantSpec, Fp8Layout (shared, torch-free);
- fp8_moe.py: the FP8 fused-MoE method (layers/quant.py's MoE hook);
- fp8_kernels.py: the GEMMs (torch._scaled_mm, a Triton block-scaled GEMM, the dequantized
  paths); kv_scales.py: FP8 KV-cache scales from checkpoints; torchao.py: `--torchao-config`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from asgl.layers.quantization.base import QuantizationError, QuantSpec
from asgl.layers.quantization.ct_schemes import check_compressed_tensors

# Schemes that run here: name -> module under asgl.layers.quantization.
SUPPORTED = {
    "fp8": "fp8",
    "modelopt": "modelopt",
    "fbgemm_fp8": "fbgemm",
    "compressed-tensors": "compressed_tensors",
}
# Accepted spellings of the same schemes.
_ALIASES = {"modelopt_fp8": "modelopt", "compressed_tensors": "compressed-tensors"}
# Known schemes that do not run yet: refused by name rather than ignored.
NOT_YET = {
    "awq": "INT4 AWQ kernels come in a later release",
    "awq_marlin": "INT4 AWQ kernels come in a later release",
    "gptq": "INT4 GPTQ kernels come in a later release",
    "gptq_marlin": "INT4 GPTQ kernels come in a later release",
    "marlin": "Marlin kernels come in a later release",
    "gguf": "packed GGUF kernels come in a later release (a .gguf model loads dequantized "
            "without --quantization)",
    "bitsandbytes": "not supported", "hqq": "not supported", "aqlm": "not supported",
    "exl2": "not supported", "squeezellm": "not supported", "eetq": "not supported",
    "quark": "not supported", "mxfp4": "not supported", "w8a8_int8": "not supported",
    "w8a8_fp8": "not supported (use a compressed-tensors or fp8 checkpoint)",
    "moe_wna16": "not supported", "qoq": "not supported", "bitnet": "not supported",
    "modelopt_fp4": "not supported", "nvfp4": "not supported", "fp_quant": "not supported",
}
# What `--quantization` can ask of a 16-bit checkpoint (quantize while loading).
_ON_LOAD = ("fp8",)
_FP8_CHECKPOINTS = ("fp8", "modelopt", "fbgemm_fp8", "compressed-tensors")


def known_methods() -> list[str]:
    return sorted(SUPPORTED)


def check_flag(name: Optional[str]) -> None:
    """`--quantization`'s value alone (preflight, before the model is looked at)."""
    if name is None:
        return
    canonical = _ALIASES.get(name, name)
    if canonical in NOT_YET:
        raise QuantizationError(f"--quantization {name}: {NOT_YET[canonical]} "
                                f"(runs now: {', '.join(known_methods())})")
    if canonical not in SUPPORTED:
        raise QuantizationError(f"unknown --quantization {name!r} "
                                f"(known: {', '.join(known_methods())})")


def read_checkpoint_config(model_dir: str, hf_config: Any = None) -> Optional[dict]:
    """The checkpoint's quantization config: config.json's `quantization_config` (from the
    loaded HF config when given), else ModelOpt's hf_quant_config.json; None when neither."""
    qc = getattr(hf_config, "quantization_config", None) if hf_config is not None else None
    if qc is None and model_dir and os.path.isfile(os.path.join(model_dir, "config.json")):
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    if qc is None and model_dir:
        path = os.path.join(model_dir, "hf_quant_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            quant = data.get("quantization", data)
            qc = {"quant_method": "modelopt", **quant}
    return qc


def checkpoint_method(qc: dict) -> str:
    """The canonical name of a checkpoint's scheme; QuantizationError when it cannot run."""
    method = str(qc.get("quant_method", "")).lower().replace("-", "_")
    method = {"compressed_tensors": "compressed-tensors"}.get(method, method)
    method = _ALIASES.get(method, method)
    where = "the checkpoint's quantization_config"
    if method in NOT_YET:
        raise QuantizationError(f"{where} uses {method!r}: {NOT_YET[method]} "
                                f"(runs now: {', '.join(known_methods())})")
    if method not in SUPPORTED:
        raise QuantizationError(f"{where} uses unknown method {qc.get('quant_method')!r} "
                                f"(known: {', '.join(known_methods())})")
    if method == "modelopt":
        algo = str(qc.get("quant_algo", "FP8")).upper()
        if algo != "FP8":
            raise QuantizationError(f"{where} uses modelopt {algo}: only modelopt FP8 runs")
    if method == "compressed-tensors":
        check_compressed_tensors(qc)
    return method


def resolve_quantization(flag: Optional[str], checkpoint: Optional[dict]) -> Optional[QuantSpec]:
    """The scheme to run with, from `--quantization` and the checkpoint's config."""
    check_flag(flag)
    flag = _ALIASES.get(flag, flag) if flag else None
    if checkpoint is not None:
        method = checkpoint_method(checkpoint)
        if flag is not None and flag != method and not (flag == "fp8"
                                                          and method in _FP8_CHECKPOINTS):
            raise QuantizationError(f"--quantization {flag}, but the checkpoint is quantized "
                                    f"with {method!r}: drop the flag or match it")
        return QuantSpec(method, dict(checkpoint), from_checkpoint=True)
    if flag is None:
        return None
    if flag not in _ON_LOAD:
        raise QuantizationError(f"--quantization {flag} needs a checkpoint quantized with "
                                f"{flag} (this one has no quantization_config); a 16-bit "
                                f"checkpoint can be quantized on load with: "
                                f"{', '.join(_ON_LOAD)}")
    return QuantSpec(flag, {})


def get_quant_config(spec: Optional[QuantSpec]) -> Any:
    """The `QuantizationConfig` of `spec` (None: unquantized). Imports torch."""
    if spec is None:
        return None
    import importlib

    module = importlib.import_module(f"asgl.layers.quantization.{SUPPORTED[spec.name]}")
    return module.from_spec(spec)
