"""Writers of tiny FP8 checkpoints in each published layout, for the quantization tests.

compressed-tensors checkpoints are made by the compressed-tensors library itself (its
presets FP8_DYNAMIC / FP8 / FP8_BLOCK, weight scales from its own `calculate_qparams`,
saved by its `ModelCompressor`). The other layouts have no CPU writer, so they are written
here from their specifications:

- `fp8` (HF FineGrainedFP8 / DeepSeek V3): `weight` FP8 e4m3 and `weight_scale_inv` per
  128 x 128 block (fp32), config {quant_method: fp8, activation_scheme: dynamic,
  weight_block_size: [128, 128]} (transformers' integrations/finegrained_fp8.py);
- `fp8` per tensor (vLLM / AutoFP8): `weight` FP8, scalar `weight_scale`, scalar
  `input_scale` when activation_scheme is static (vLLM fp8.py);
- `modelopt` FP8: the per-tensor tensors above (always a static `input_scale`), config
  {quant_method: modelopt, quant_algo: FP8}, plus `k_proj.k_scale` / `v_proj.v_scale`;
- `fbgemm_fp8`: `weight` FP8 and `weight_scale` [out, 1] fp32 per channel, config
  {quant_method: fbgemm_fp8, activation_scale_ub} (transformers' FbgemmFp8Linear).

The tests check each writer with the format's own loader where one runs on the CPU
(transformers' FP8 loader with dequantize=True; compressed-tensors' decompression through
transformers), otherwise against the loader's module layout (FbgemmFp8Linear).
"""

from __future__ import annotations

import json
import os

import torch
import transformers
from safetensors.torch import save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY = dict(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, architectures=["LlamaForCausalLM"], tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)


def tiny_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A tiny random Llama in float32 (weights scaled up so logits have clear gaps)."""
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().max().float() / FP8_MAX
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1, keepdim=True).float() / FP8_MAX
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def per_block(w: torch.Tensor, bn: int = 128, bk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    blocks = w.reshape(n // bn, bn, k // bk, bk)
    scale = blocks.abs().amax(dim=(1, 3)).float() / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(n, k), scale


def _save(model, path: str, tensors: dict, quant_config: dict | None) -> str:
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path,
                                                                             "model.safetensors"))
    if quant_config is not None:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        cfg["quantization_config"] = quant_config
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    return path


def write_hf_fp8_block(model, path: str) -> str:
    out = {}
    for name, w in model.state_dict().items():
        if is_linear(name):
            q, s = per_block(w)
            out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = w
    return _save(model, path, out, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                    "weight_block_size": [128, 128], "fmt": "e4m3"})


def write_fp8_per_tensor(model, path: str, *, static: bool = True, modelopt: bool = False,
                         kv_scales: tuple[float, float] | None = None) -> str:
    out = {}
    for name, w in model.state_dict().items():
        if is_linear(name):
            q, s = per_tensor(w)
            base = name[:-len(".weight")]
            out[name], out[base + ".weight_scale"] = q, s
            if static or modelopt:
                out[base + ".input_scale"] = torch.tensor(6.0 / FP8_MAX)
        else:
            out[name] = w
    if kv_scales is not None:
        for i in range(model.config.num_hidden_layers):
            out[f"model.layers.{i}.self_attn.k_proj.k_scale"] = torch.tensor(kv_scales[0])
            out[f"model.layers.{i}.self_attn.v_proj.v_scale"] = torch.tensor(kv_scales[1])
    if modelopt:
        qc = {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
              "exclude_modules": ["lm_head"]}
    else:
        qc = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    return _save(model, path, out, qc)


def write_fbgemm(model, path: str) -> str:
    out = {}
    for name, w in model.state_dict().items():
        if is_linear(name):
            q, s = per_channel(w)
            out[name], out[name[:-len(".weight")] + ".weight_scale"] = q, s
        else:
            out[name] = w
    return _save(model, path, out, {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                    "modules_to_not_convert": ["lm_head"]})


def write_compressed_tensors(model, path: str, preset: str) -> str:
    """`preset`: FP8_DYNAMIC (channel weights, dynamic tokens), FP8 (tensor weights, static
    tensor activations) or FP8_BLOCK (128 x 128 blocks, dynamic groups of 128)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, apply_quantization_config,
                                                 preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams

    m = transformers.LlamaForCausalLM(model.config)
    m.load_state_dict(model.state_dict())
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                            ignore=["lm_head"])
    apply_quantization_config(m, qc)
    with torch.no_grad():
        for _, mod in m.named_modules():
            scheme = getattr(mod, "quantization_scheme", None)
            if scheme is None:
                continue
            w, args = mod.weight.data, scheme.weights
            if args.strategy == "tensor":
                lo, hi = w.min().reshape(1), w.max().reshape(1)
            elif args.strategy == "channel":
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            else:
                bn, bk = args.block_structure
                wb = w.reshape(w.shape[0] // bn, bn, w.shape[1] // bk, bk)
                lo, hi = wb.amin((1, 3)), wb.amax((1, 3))
            scale, _ = calculate_qparams(lo, hi, args)
            mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
            if hasattr(mod, "input_scale"):
                s, _ = calculate_qparams(torch.tensor([-6.0]), torch.tensor([6.0]),
                                         scheme.input_activations)
                mod.input_scale.data.copy_(s.reshape(1))
    compressor = ModelCompressor.from_pretrained_model(m, quantization_format="float-quantized")
    compressor.compress_model(m)
    m.save_pretrained(path)
    compressor.update_config(path)
    return path
