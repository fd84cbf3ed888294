"""A tiny Llama in every FP8 checkpoint layout loads, keeps FP8 weights, and its greedy
tokens equal a float32 HF transformers model holding the same dequantized weights.

The reference weights come from the format's own loader where one runs on the CPU
(transformers' FP8 loader with dequantize=True; compressed-tensors' decompression), else
from the format's definition (q.float() * scale, the spec of fbgemm_fp8 / ModelOpt FP8).
The CPU path computes with exactly those dequantized weights, so tokens must match except
after a position where the reference's top-2 logit gap is below 1e-3 (batched float32
matmuls differ from unbatched ones in the last bits).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from fp8_checkpoints import (FP8, is_linear, per_channel, tiny_model, write_compressed_tensors,
                             write_fbgemm, write_fp8_per_tensor, write_hf_fp8_block)
from tests.conftest import make_llm

MAX_NEW = 12
TIE_GAP = 1e-3
PROMPTS = [[5, 17, 33, 101, 7], [200, 3, 3, 9, 45, 61, 77, 12, 8], [42]]


@pytest.fixture(scope="module")
def base():
    return tiny_model()


def _reference_from_state(base, state: dict[str, torch.Tensor]) -> transformers.PreTrainedModel:
    ref = transformers.LlamaForCausalLM(base.config).eval()
    ref.load_state_dict(state)
    return ref


def _dequantized_state(path: str, scale_suffix: str = "_scale") -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with every FP8 weight times its (per-tensor or per-channel)
    scale, as the format defines it."""
    out = {}
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        names = list(f.keys())
        for name in names:
            if is_linear(name):
                w = f.get_tensor(name).float()
                s = f.get_tensor(name + scale_suffix).float()
                out[name] = w * (s.reshape(-1, 1) if s.numel() > 1 else s)
            elif not name.endswith(("_scale", "input_scale", "k_scale", "v_scale")):
                out[name] = f.get_tensor(name)
    return out


def _hf_dequantize_load(path: str, quant_config) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant_config, dtype=torch.float32)
    return model.eval()


def _greedy_ref(ref, ids: list[int]) -> tuple[list[int], list[float]]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                           output_logits=True, return_dict_in_generate=True,
                           pad_token_id=0, eos_token_id=None)
    gaps = [float(g[0] - g[1]) for g in (torch.topk(lg[0].float(), 2).values
                                          for lg in out.logits)]
    return out.sequences[0, len(ids):].tolist(), gaps


def _assert_greedy_matches(path: str, ref, **options) -> object:
    """Run the engine on `path`; compare with `ref`; return the engine's model (for checks)."""
    with make_llm(model_path=path, skip_tokenizer_init=True, max_total_tokens=2048,
                  **options) as llm:
        outs = llm.generate(PROMPTS, {"temperature": 0, "max_new_tokens": MAX_NEW,
                                      "ignore_eos": True})
        model = llm.engine.runner.model
    for ids, out in zip(PROMPTS, outs):
        want, gaps = _greedy_ref(ref, ids)
        got = out.output_ids
        for i, (a, b) in enumerate(zip(got, want)):
            if a != b:
                assert gaps[i] < TIE_GAP, (f"{path}: token {i} is {a}, reference {b} with a "
                                           f"top-2 gap {gaps[i]:.2e}\n{got}\n{want}")
                break
        else:
            assert len(got) == len(want) == MAX_NEW
    return model


def _assert_fp8_layers(model, scale_name: str = "weight_scale") -> None:
    from asgl.layers.linear import LinearBase
    from asgl.layers.quantization.fp8 import Fp8LinearMethod

    layers = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down per layer
    for layer in layers:
        assert isinstance(layer.quant_method, Fp8LinearMethod), layer.prefix
        assert layer.weight.dtype == FP8, layer.prefix
        assert getattr(layer, scale_name).dtype == torch.float32


def test_quantize_on_load_fp8(base, tmp_path):
    """--quantization fp8 on a float32 checkpoint: per-channel e4m3 weights."""
    path = str(tmp_path / "f32")
    base.save_pretrained(path)
    state = {}
    for name, w in base.state_dict().items():
        if is_linear(name):
            q, s = per_channel(w)
            w = q.float() * s
        state[name] = w
    model = _assert_greedy_matches(path, _reference_from_state(base, state), quantization="fp8")
    _assert_fp8_layers(model)


def test_hf_fp8_block_checkpoint(base, tmp_path):
    """DeepSeek V3 style: 128x128 blocks, weight_scale_inv; checked by transformers' loader."""
    path = write_hf_fp8_block(base, str(tmp_path / "block"))
    ref = _hf_dequantize_load(path, transformers.FineGrainedFP8Config(dequantize=True))
    model = _assert_greedy_matches(path, ref)  # no flag: the checkpoint says fp8
    _assert_fp8_layers(model, "weight_scale_inv")


def test_fp8_per_tensor_static_checkpoint(base, tmp_path):
    """vLLM / AutoFP8 per-tensor layout with static input scales."""
    path = write_fp8_per_tensor(base, str(tmp_path / "tensor"), static=True)
    state = _dequantized_state(path)
    # The writer checked by transformers' FP8 loader: the same tensors under its per-tensor
    # names (weight_scale_inv, no block size) dequantize to the same weights.
    alias = str(tmp_path / "tensor_hf")
    shutil.copytree(path, alias)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        renamed = {n.replace(".weight_scale", ".weight_scale_inv"): f.get_tensor(n)
                   for n in f.keys() if not n.endswith("input_scale")}
    save_file(renamed, os.path.join(alias, "model.safetensors"))
    hf = _hf_dequantize_load(alias, transformers.FineGrainedFP8Config(
        dequantize=True, weight_block_size=None))
    for name, w in hf.state_dict().items():
        torch.testing.assert_close(w.float(), state[name].float(), rtol=0, atol=1e-6)
    model = _assert_greedy_matches(path, _reference_from_state(base, state),
                                   quantization="fp8")  # the flag agrees with the checkpoint
    _assert_fp8_layers(model)
    layer = model.model.layers[0].self_attn.qkv_proj
    assert layer.input_scale.shape == (1,) and layer.weight_scale.shape == (layer.weight.shape[0],)


def test_modelopt_fp8_checkpoint(base, tmp_path):
    path = write_fp8_per_tensor(base, str(tmp_path / "modelopt"), modelopt=True,
                                kv_scales=(0.5, 0.25))
    model = _assert_greedy_matches(path, _reference_from_state(base, _dequantized_state(path)))
    _assert_fp8_layers(model)


def test_fbgemm_fp8_checkpoint(base, tmp_path):
    from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear

    path = write_fbgemm(base, str(tmp_path / "fbgemm"))
    # the writer's tensors have the names, shapes and dtypes of transformers' fbgemm layer
    layer = FbgemmFp8Linear(256, 384, bias=False)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        for name, p in layer.named_parameters():
            t = f.get_tensor(f"model.layers.0.mlp.gate_proj.{name}")
            assert (t.shape, t.dtype) == (p.shape, p.dtype), name
    model = _assert_greedy_matches(path, _reference_from_state(base, _dequantized_state(path)))
    _assert_fp8_layers(model)


@pytest.mark.parametrize("preset,scale_shape", [("FP8_DYNAMIC", "channel"),
                                                ("FP8", "tensor"), ("FP8_BLOCK", "block")])
def test_compressed_tensors_checkpoint(base, tmp_path, preset, scale_shape):
    """Written by the compressed-tensors library, dequantized by its own decompression."""
    pytest.importorskip("compressed_tensors")
    path = write_compressed_tensors(base, str(tmp_path / preset), preset)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["quantization_config"]["format"] == "float-quantized"
    ref = _hf_dequantize_load(path, transformers.CompressedTensorsConfig(run_compressed=False))
    model = _assert_greedy_matches(path, ref)
    _assert_fp8_layers(model)
    assert model.model.layers[0].mlp.down_proj.quant_method.layout.weight == scale_shape
