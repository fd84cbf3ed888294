"""Choosing a quantization method: an unknown or unsupported one (`--quantization bogus`, an
AWQ/GPTQ checkpoint, a compressed-tensors INT8 one, a bad --torchao-config) fails at start-up
with a message naming it, before any weight is read; the FP8 kernels' CPU paths match their
torch references; the fused-layer ignore rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from asgl.config import ConfigError, EngineConfig
from asgl.engine.contracts.errors import ModelLoadError
from asgl.layers.quantization import QuantizationError, resolve_quantization
from asgl.models.loader import resolve_model
from asgl.server.launch import preflight

TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
               "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 2}


def _checkpoint(tmp_path, quantization_config) -> str:
    """A model directory whose only weight file is garbage: reading any weight fails, so an
    error naming the method proves it came first."""
    cfg = dict(TINY_CONFIG, quantization_config=quantization_config)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    return str(tmp_path)


@pytest.mark.parametrize("flag,words", [("bogus", ["unknown", "'bogus'", "fp8"]),
                                         ("awq", ["awq", "later"]), ("gptq", ["gptq"])])
def test_flag_refused_in_preflight(flag, words):
    with pytest.raises(ConfigError) as e:
        preflight(EngineConfig(quantization=flag), bind=False)
    for w in words:
        assert w in str(e.value)


def test_preflight_imports_no_torch():
    code = ("import sys; from asgl.config import EngineConfig, ConfigError\n"
            "from asgl.server.launch import preflight\n"
            "try:\n    preflight(EngineConfig(quantization='bogus'), bind=False)\n"
            "except ConfigError as e:\n    print('refused', e)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=60)
    assert "refused unknown --quantization 'bogus'" in out.stdout, out.stderr
    assert out.stdout.strip().endswith("False")


@pytest.mark.parametrize("qc,words", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, ["'awq'", "later"]),
    ({"quant_method": "gptq", "bits": 4}, ["'gptq'"]),
    ({"quant_method": "mystery"}, ["unknown method 'mystery'"]),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, ["modelopt NVFP4"]),
    ({"quant_method": "compressed-tensors", "format": "int-quantized",
      "config_groups": {}}, ["int-quantized"]),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "g": {"targets": ["Linear"], "weights": {"type": "int", "num_bits": 8}}}},
     ["type int"]),
])
def test_checkpoint_method_refused_before_weights(tmp_path, qc, words):
    path = _checkpoint(tmp_path, qc)
    with pytest.raises(ModelLoadError) as e:
        resolve_model(EngineConfig(model_path=path))
    for w in words:
        assert w in str(e.value)
    assert "corrupt" not in str(e.value)
    with pytest.raises(ConfigError) as e2:  # and `asgl serve` refuses it in preflight
        preflight(EngineConfig(model_path=path), bind=False)
    assert words[0] in str(e2.value)


def test_flag_must_agree_with_checkpoint(tmp_path):
    path = _checkpoint(tmp_path, {"quant_method": "fbgemm_fp8"})
    with pytest.raises(ModelLoadError, match="--quantization modelopt, but the checkpoint is "
                                             "quantized with 'fbgemm_fp8'"):
        resolve_model(EngineConfig(model_path=path, quantization="modelopt"))
    # fp8 names the family: accepted for any FP8 checkpoint
    assert resolve_quantization("fp8", {"quant_method": "fbgemm_fp8"}).name == "fbgemm_fp8"


def test_checkpoint_scheme_needs_checkpoint():
    with pytest.raises(QuantizationError, match="needs a checkpoint quantized with modelopt"):
        resolve_quantization("modelopt", None)
    assert resolve_quantization("fp8", None).name == "fp8"
    assert resolve_quantization(None, None) is None


def test_modelopt_hf_quant_config(tmp_path):
    from asgl.layers.quantization import read_checkpoint_config

    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8",
                                                            "kv_cache_quant_algo": "FP8"}}))
    qc = read_checkpoint_config(str(tmp_path))
    assert resolve_quantization(None, qc).name == "modelopt"


@pytest.mark.parametrize("value,quant,words", [
    ("int4wo-100", None, ["group size"]), ("int3", None, ["unknown --torchao-config 'int3'"]),
    ("int8wo", "fp8", ["cannot be combined", "fp8"])])
def test_torchao_flag_refused(value, quant, words):
    with pytest.raises(ConfigError) as e:
        preflight(EngineConfig(torchao_config=value, quantization=quant), bind=False)
    for w in words:
        assert w in str(e.value)


def test_fused_layer_ignore_rules():
    from asgl.layers.quantization.fp8 import layer_is_ignored

    assert layer_is_ignored("model.layers.0.mlp.gate_up_proj", ["re:.*mlp.*"])
    assert not layer_is_ignored("model.layers.0.mlp.gate_up_proj", ["lm_head"])
    assert layer_is_ignored("model.layers.1.self_attn.qkv_proj", ["model.layers.1.self_attn*"])
    with pytest.raises(QuantizationError, match="only some of"):
        layer_is_ignored("model.layers.0.self_attn.qkv_proj", ["model.layers.0.self_attn.q_proj"])


# ---------------------------------------------------------------- kernels vs torch references
def test_rowwise_quantization_roundtrip():
    from asgl.layers.quantization.fp8_kernels import FP8, quantize_rowwise

    x = torch.randn(7, 96) * torch.linspace(0.01, 30, 7)[:, None]
    q, s = quantize_rowwise(x)
    assert q.dtype == FP8 and s.shape == (7, 1)
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 per element (normal range)
    err = (q.float() * s - x).abs() / x.abs().amax(1, keepdim=True)
    assert float(err.max()) <= 2 ** -4
    assert float((q.float().abs().amax(1) - 448).abs().max()) == 0  # the row max maps to 448


def test_block_gemm_triton_matches_reference():
    """The Triton block-scaled GEMM (run by its interpreter on the CPU) against the float32
    dequantize-and-matmul reference, ragged M and a partial last N block."""
    from asgl.layers.quantization.fp8_kernels import (FP8, quantize_groupwise,
                                                      w8a8_block_matmul,
                                                      w8a8_block_matmul_reference)

    gen = torch.Generator().manual_seed(3)
    M, N, K = 19, 320, 256
    x = torch.randn(M, K, generator=gen)
    w = (torch.randn(N, K, generator=gen) * 0.05).to(FP8)
    ws = torch.rand(3, 2, generator=gen) + 0.5
    xq, xs = quantize_groupwise(x, 128)
    ref = w8a8_block_matmul_reference(xq, w, xs, ws, (128, 128), torch.float32)
    out = w8a8_block_matmul(xq, w, xs, ws, (128, 128), torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_cpu_linear_paths_equal_dequantized_matmul():
    from asgl.layers.quantization.fp8_kernels import (apply_fp8_block, apply_fp8_rowwise,
                                                      quantize_weight_per_channel)

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 256, generator=gen)
    w = torch.randn(128, 256, generator=gen) * 0.1
    q, s = quantize_weight_per_channel(w)
    bias = torch.randn(128, generator=gen)
    ref = x @ (q.float() * s[:, None]).T + bias
    torch.testing.assert_close(apply_fp8_rowwise(x, q, s, None, bias), ref)
    sb = torch.rand(1, 2, generator=gen) + 0.5
    refb = x @ (q.float() * sb.repeat_interleave(128, 0).repeat_interleave(128, 1)).T
    torch.testing.assert_close(apply_fp8_block(x, q, sb, (128, 128)), refb)


# ---------------------------------------------------------------- the fused-MoE hook
@pytest.mark.parametrize("kind", ["dynamic", "tensor", "block"])
def test_fp8_moe_method_matches_dequantized_experts(kind):
    """The MoE hook's FP8 method against the Mixtral expert equation on the dequantized
    weights: out = sum_k w_k * W2_e (silu(W1_e x) * W3_e x) over each token's top-k."""
    from torch import nn

    from asgl.layers.quantization.fp8 import Fp8Config, Fp8Layout
    from asgl.layers.quantization.fp8_kernels import dequantize_block

    E, H, I, T = 4, 128, 256, 6
    layout = {"dynamic": Fp8Layout("dynamic"), "tensor": Fp8Layout("tensor"),
              "block": Fp8Layout("block", block=(128, 128), scale_name="weight_scale_inv")}[kind]
    layer = nn.Module()
    method = Fp8Config(layout).get_moe_method(layer, "model.layers.0.mlp.experts")
    method.create_weights(layer, E, H, I, torch.float32, lambda *a: None)
    gen = torch.Generator().manual_seed(5)
    w13 = torch.randn(E, 2 * I, H, generator=gen) * 0.05
    w2 = torch.randn(E, H, I, generator=gen) * 0.05
    with torch.no_grad():
        if kind == "dynamic":
            layer.w13_weight.copy_(w13)
            layer.w2_weight.copy_(w2)
        else:
            layer.w13_weight.copy_((w13 * 100).to(torch.float8_e4m3fn))
            layer.w2_weight.copy_((w2 * 100).to(torch.float8_e4m3fn))
            for name in ("w13", "w2"):
                scale = getattr(layer, f"{name}_{layout.scale_name}")
                scale.copy_(torch.rand(scale.shape, generator=gen) * 0.02 + 0.005)
    raw = {n: p.detach().clone() for n, p in layer.named_parameters()}
    method.process_weights_after_loading(layer)

    def deq(name: str, e: int) -> torch.Tensor:
        w = getattr(layer, f"{name}_weight")[e].float()
        if kind == "block":
            return dequantize_block(w, raw[f"{name}_weight_scale_inv"][e], (128, 128))
        if kind == "tensor":
            s = raw[f"{name}_weight_scale"][e]
            return w * (s.repeat_interleave(I)[:, None] if name == "w13" else s)
        return w * layer.__getattr__(f"{name}_weight_scale")[e][:, None]

    x = torch.randn(T, H, generator=gen)
    topk_ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)])
    topk_w = torch.rand(T, 2, generator=gen)
    ref = torch.zeros(T, H)
    for t in range(T):
        for k in range(2):
            e = int(topk_ids[t, k])
            gate, up = (deq("w13", e) @ x[t]).chunk(2)
            ref[t] += topk_w[t, k] * (deq("w2", e) @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(method.apply(layer, x, topk_w, topk_ids), ref, rtol=1e-4,
                               atol=1e-5)
    assert layer.w13_weight.dtype == torch.float8_e4m3fn


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Triton 3.9's interpreter converts float32 to float8 wrongly "
                           "(125.5 -> 64.0): GPU only (also checked by bench/gpu_fp8.py)")
@pytest.mark.parametrize("ub", [None, 0.5])
def test_fused_per_token_quant_matches_torch(ub):
    """The one-launch Triton activation quantizer against the torch form, bit for bit: same
    scales, same FP8 codes."""
    from asgl.layers.quantization.fp8_kernels import quantize_rowwise, quantize_rowwise_fused

    x = (torch.randn(5, 300, generator=torch.Generator().manual_seed(6)) * 3).cuda()
    x[2] = 0  # an all-zero row takes the minimum scale
    q, s = quantize_rowwise_fused(x, ub)
    q_ref, s_ref = quantize_rowwise(x, ub)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_memory_plan_counts_what_fp8_frees():
    """The start-up note's numbers: FP8 weights take 1 byte where float32 took 4, plus
    their float32 row scales; everything else is counted as it is."""
    import transformers

    from asgl.layers.linear import LinearBase
    from asgl.layers.quantization import get_quant_config, resolve_quantization
    from asgl.layers.quantization.loading import (describe_savings, process_after_loading,
                                                  weight_bytes)
    from asgl.models.dummy_weights import init_dummy_weights
    from asgl.models.llama import LlamaForCausalLM

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = LlamaForCausalLM(config, get_quant_config(resolve_quantization("fp8", None)))
    init_dummy_weights(model)
    process_after_loading(model)
    actual, full = weight_bytes(model, torch.float32)
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    saved = sum(m.weight.numel() * 3 - m.weight_scale.numel() * 4 for m in linears)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert full - actual == saved > 0
    _, note = describe_savings(model, torch.float32, "fp8")
    assert f"{(full - actual) / 2**20:.2f} MiB more for the KV pool" in note
