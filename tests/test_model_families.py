"""Each dense family against HF transformers, through the whole engine (`asgl.LLM`).

A tiny random-weight checkpoint of the family is written with `save_pretrained`; the engine
serves it in float32 on the CPU with chunked prefill (chunks of 8 tokens), and:

- every logits row the engine computes (all prompt rows, asked for through prompt logprobs,
  then each decode step) is within 1e-4 relative of HF's logits at the same positions;
- its greedy tokens equal HF's greedy tokens (past a near-tie, top-2 gap < 1e-3, the
  comparison stops: batched and unbatched fp32 matmuls differ in the last bits);
- a second prompt sharing a prefix hits the radix cache and matches HF the same way;
- the end-of-turn id listed in generation_config.json's eos_token_id (Gemma's
  <end_of_turn>, Phi-3's <|end|>, ...) stops generation.

Prompts are longer than the sliding window of the families that have one (window 6). The
checks shared with the other family tests live in tests/family_harness.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from family_harness import (EOS, MAX_NEW, VOCAB, LogitsTap, check_billions, check_cold_prompt,
                            check_hf_tp2, check_through_engine, finish_gguf, first_prompt,
                            gguf_base_ints, gguf_tensor_name, hf_greedy, hf_logits, make_family_llm,
                            meta_model, random_hf_model)
from helpers import rel_err
from tests.conftest import make_llm

# test_model_impl.py and bench/gpu_mla.py take these from here
_LogitsTap, _hf_logits = LogitsTap, hf_logits

WINDOW = 6
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, initializer_range=0.1, bos_token_id=1,
            eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False)
GEMMA = dict(rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")

FAMILIES = {
    "qwen3": ("Qwen3Config", dict(rms_norm_eps=1e-6)),
    "qwen3_window": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=WINDOW,
                                         max_window_layers=1)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=3.0, residual_multiplier=0.6,
                                      attention_multiplier=0.1, logits_scaling=2.5,
                                      attention_bias=True)),
    "olmo2": ("Olmo2Config", dict(rms_norm_eps=1e-6)),
    "gemma": ("GemmaConfig", dict(GEMMA, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", dict(GEMMA, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                    num_hidden_layers=3)),
    # six layers: the default 5:1 sliding pattern; different RoPE bases per layer type
    "gemma3": ("Gemma3TextConfig", dict(GEMMA, sliding_window=WINDOW, query_pre_attn_scalar=32,
                                        num_hidden_layers=6, rope_theta=100000.0,
                                        rope_local_base_freq=1000.0)),
    "phi3": ("Phi3Config", dict(rms_norm_eps=1e-5, sliding_window=None)),
    "phi3_longrope": ("Phi3Config", dict(
        sliding_window=WINDOW, max_position_embeddings=256, original_max_position_embeddings=64,
        rope_scaling=dict(type="longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
                          long_factor=[2.0 + 0.5 * i for i in range(8)]))),
    "stablelm": ("StableLmConfig", dict(use_qkv_bias=True, partial_rotary_factor=0.25,
                                        use_parallel_residual=False)),
    "stablelm_parallel": ("StableLmConfig", dict(partial_rotary_factor=0.5,
                                                 use_parallel_residual=True)),
    "stablelm_qk_norm": ("StableLmConfig", dict(partial_rotary_factor=0.25, qk_layernorm=True,
                                                use_parallel_residual=True)),
    "cohere": ("CohereConfig", dict(logit_scale=0.5, tie_word_embeddings=True)),
    "cohere_qk_norm": ("CohereConfig", dict(logit_scale=0.25, use_qk_norm=True,
                                            tie_word_embeddings=True)),
    # 4 layers: three windowed with RoPE, one global without position encoding
    "cohere2": ("Cohere2Config", dict(logit_scale=0.5, tie_word_embeddings=True,
                                      sliding_window=WINDOW, num_hidden_layers=4)),
}

WINDOWED = {"qwen3_window", "gemma2", "gemma3", "phi3_longrope", "cohere2"}


def _config(family: str):
    cls_name, extra = FAMILIES[family]
    fields = {**TINY, **extra}
    if cls_name == "Gemma3TextConfig":  # transformers 5 takes the local base per layer type
        local = fields.pop("rope_local_base_freq")
        fields["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": fields.pop("rope_theta")},
            "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    return getattr(transformers, cls_name)(**fields)


def _hf_model(family: str):
    return random_hf_model(_config(family))


# The Triton kernels (under TRITON_INTERPRET on the CPU) where the attention itself changes:
# soft-capping, a non-default scale, windowed layers alternating with global ones.
CASES = [(f, "torch") for f in FAMILIES] + [("gemma2", "triton")]


@pytest.mark.parametrize("family,backend", CASES, ids=[f"{f}-{b}" for f, b in CASES])
def test_family_matches_hf_through_engine(family, backend, tmp_path):
    hf = _hf_model(family)
    prompt, gen = first_prompt()
    ref, gaps = hf_greedy(hf, prompt, MAX_NEW)
    # an end-of-turn id next to EOS in generation_config, as chat checkpoints list them
    stop_at = next(i for i, t in enumerate(ref) if t in (EOS, ref[3]))
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [EOS, ref[3]], "bos_token_id": 1}))
    if family in WINDOWED:
        assert len(prompt) > 3 * WINDOW

    llm = make_family_llm(tmp_path, attention_backend=backend)
    try:
        # a cold prompt, then one sharing 16 tokens (served partly from the radix cache)
        cold = check_through_engine(llm, lambda ids: hf_logits(hf, ids), prompt, ref, gaps,
                                    gen, family)
        # the end-of-turn id from generation_config stops generation
        out3 = llm.generate(prompt, {"temperature": 0.0, "max_new_tokens": MAX_NEW})
        if cold.agree > stop_at:
            assert out3.output_ids == ref[:stop_at + 1]
            assert out3.finish_reason["type"] == "stop"
    finally:
        llm.shutdown()


# Published parameter counts (model cards), in billions: the dummy presets have the real shapes.
PRESET_SIZES = {"gemma-2-9b": 9.24, "gemma-2-2b": 2.61, "gemma-7b": 8.54, "gemma-3-270m": 0.268,
                "qwen3-8b": 8.19, "qwen3-0.6b": 0.596, "phi-3-mini": 3.82, "olmo-2-7b": 7.30,
                "granite-3.1-8b": 8.17, "stablelm-2-1.6b": 1.64, "command-r": 35.0}


@pytest.mark.parametrize("name", list(PRESET_SIZES))
def test_dummy_preset_shapes(name):
    from asgl.models import presets

    check_billions(meta_model(presets.get_preset(name).hf_config()), PRESET_SIZES[name])


# ---------------------------------------------------------------------------- TP
TP_FAMILIES = ["qwen3", "gemma3", "stablelm_qk_norm", "cohere_qk_norm"]


def test_tensor_parallel_2_ranks_match_hf(tmp_path):
    """Two gloo ranks, each with half the heads: per-head q/k norms (RMS, Gemma's 1 + w,
    and LayerNorm with a weight per head, loaded whole or one head at a time), windows,
    per-layer-type RoPE, tied heads."""
    check_hf_tp2(tmp_path, _hf_model, TP_FAMILIES)


# ---------------------------------------------------------------------------- GGUF
# A tiny GGUF per llama.cpp architecture, written the way llama.cpp's converter writes it
# (its tensor names, Gemma's norms stored as 1 + w, Phi-3's fused tensors and LongRoPE
# factors), from the same random HF model the engine's output is compared with. transformers
# reads the file too (its own name mapping, where it knows the architecture), so the writer
# here cannot share a mistake with asgl's reader unnoticed. Fields a GGUF does not store
# follow llama.cpp's defaults in the HF configs (Gemma's query_pre_attn_scalar = head_dim,
# Gemma 3's local RoPE base 10000).
GGUF_CASES = {
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False), "rms"),
    "qwen3": ("Qwen3Config", dict(rms_norm_eps=1e-6), "rms"),
    "gemma": ("GemmaConfig", dict(GEMMA, hidden_act="gelu_pytorch_tanh"), "rms"),
    "gemma2": ("Gemma2Config", dict(GEMMA, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                    num_hidden_layers=3), "rms"),
    "gemma3": ("Gemma3TextConfig", dict(GEMMA, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                        num_hidden_layers=6, rope_theta=100000.0,
                                        rope_local_base_freq=10000.0), "rms"),
    "phi3": ("Phi3Config", dict(
        sliding_window=WINDOW, original_max_position_embeddings=64,
        rope_scaling=dict(type="longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
                          long_factor=[2.0 + 0.5 * i for i in range(8)])), "rms"),
    "stablelm": ("StableLmConfig", dict(use_qkv_bias=True, partial_rotary_factor=0.25,
                                        use_parallel_residual=False), "layer"),
    "command-r": ("CohereConfig", dict(logit_scale=0.5, tie_word_embeddings=True), "layer"),
}
_HF_ONLY = {"rotary_emb", "inv_freq"}


def _write_gguf(hf, arch: str, path) -> None:
    import gguf
    from asgl.models import gguf_arch

    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    put = lambda key, value, vtype: w.add_key_value(f"{arch}.{key}", value, vtype)  # noqa: E731
    U32, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    head_dim = c.head_dim
    for key, value in gguf_base_ints(c):
        put(key, value, U32)
    from asgl.layers.rotary import rope_parameters
    params = rope_parameters(c, "full_attention" if arch == "gemma3" else None)
    put("rope.freq_base", float(params["rope_theta"]), F32)
    partial = params.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    put("rope.dimension_count", int(head_dim * partial), U32)
    if GGUF_CASES[arch][2] == "rms":
        put("attention.layer_norm_rms_epsilon", float(c.rms_norm_eps), F32)
    else:
        put("attention.layer_norm_epsilon", float(c.layer_norm_eps), F32)
    if getattr(c, "sliding_window", None):
        put("attention.sliding_window", c.sliding_window, U32)
    if arch == "gemma2":
        put("attn_logit_softcapping", float(c.attn_logit_softcapping), F32)
        put("final_logit_softcapping", float(c.final_logit_softcapping), F32)
    if arch == "command-r":
        put("logit_scale", float(c.logit_scale), F32)
    if arch == "phi3":
        put("rope.scaling.original_context_length", c.original_max_position_embeddings, U32)
        for kind in ("long", "short"):
            w.add_tensor(f"rope_factors_{kind}.weight",
                         np.array(params[f"{kind}_factor"], dtype=np.float32))

    inverse = {hf_part: gg for gg, hf_part in gguf_arch.LAYER_NAMES[arch].items()}
    for name, tensor in hf.state_dict().items():
        if any(h in name for h in _HF_ONLY) or (name == "lm_head.weight"
                                                and c.tie_word_embeddings):
            continue
        data = tensor.float()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp's Gemma converter stores 1 + w
        w.add_tensor(gguf_tensor_name(name, inverse), data.numpy())
    finish_gguf(w)


@pytest.mark.parametrize("arch", list(GGUF_CASES))
def test_gguf_family_matches_hf(arch, tmp_path, monkeypatch):
    from asgl.models import gguf_loader

    cls_name, extra, _ = GGUF_CASES[arch]
    FAMILIES[f"gguf-{arch}"] = (cls_name, extra)
    try:
        hf = _hf_model(f"gguf-{arch}")
    finally:
        del FAMILIES[f"gguf-{arch}"]
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(hf, arch, path)
    prompt = torch.randint(2, VOCAB - 1, (21,), generator=torch.Generator().manual_seed(9)).tolist()

    if arch in ("qwen2", "qwen3", "gemma2", "gemma3", "phi3", "stablelm"):
        # transformers' own GGUF reader finds the model's tensors under their HF names
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        empty = transformers.AutoModelForCausalLM.from_config(hf.config)
        theirs = load_gguf_checkpoint(str(path), return_tensors=True,
                                      model_to_load=empty)["tensors"]
        ours = {k: v for k, v in hf.state_dict().items()
                if not any(h in k for h in _HF_ONLY) and k in theirs}
        assert len(ours) >= len(hf.state_dict()) - 1  # all, maybe less a tied lm_head
        for name, tensor in ours.items():
            torch.testing.assert_close(torch.as_tensor(theirs[name]).float(), tensor.float(),
                                       msg=name)

    # The tokenizer's conversion is the same for every architecture (transformers reads the
    # GGUF vocabulary); these files have none. Gemma 3 270M's test converts a real one.
    monkeypatch.setattr(gguf_loader, "_save_tokenizer", lambda *a, **k: None)
    monkeypatch.setenv("ASGL_CACHE_DIR", str(tmp_path / "cache"))
    llm = make_family_llm(path)
    try:
        check_cold_prompt(llm, hf, prompt, f"gguf {arch}")
    finally:
        llm.shutdown()


# ---------------------------------------------------------------------------- CUDA
# FlashInfer and Triton on a GPU against the torch backend on the same GPU (bf16 all): a
# Gemma 2 shape (head dim 256, windowed layers alternating with global ones, soft-capped
# attention, query_pre_attn_scalar != head_dim) with CUDA graphs, chunked prefill, a radix
# hit and decode. The torch backend is the reference the CPU tests tie to transformers.
GPU_GEMMA2 = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=256,
                  max_position_embeddings=1024, initializer_range=0.05, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=EOS, pad_token_id=0, sliding_window=37,
                  query_pre_attn_scalar=144, attn_logit_softcapping=20.0,
                  final_logit_softcapping=10.0, hidden_activation="gelu_pytorch_tanh")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_gpu_backend_matches_torch_backend(backend, tmp_path):
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(**GPU_GEMMA2))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, VOCAB - 1, (n,), generator=gen).tolist() for n in (150, 90, 3)]
    prompts.append(prompts[0][:120] + prompts[1][:20])  # radix hit past the window
    params = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}

    def run(attn: str, graphs: bool):
        llm = make_llm(model_path=str(tmp_path), dtype="bfloat16", device="cuda",
                       attention_backend=attn, chunked_prefill_size=64, max_total_tokens=4096,
                       context_length=512, disable_cuda_graph=not graphs, skip_tokenizer_init=True)
        try:
            assert type(llm.engine.runner.attn_backend).name == attn  # no silent fallback
            tap = LogitsTap(llm.engine.runner.model)
            outs = [llm.generate(p, params) for p in prompts]  # one at a time: rows in order
            logits = tap.take()
            batch = llm.generate(prompts, params)  # together: batched decode
            return outs, logits, batch
        finally:
            llm.shutdown()

    ref_outs, ref_logits, ref_batch = run("torch", graphs=False)
    outs, logits, _ = run(backend, graphs=False)  # graphs pad the logits rows: off here
    assert outs[3].cached_tokens >= 64
    assert [o.output_ids[0] for o in outs] == [o.output_ids[0] for o in ref_outs]
    # bf16 end to end: the backends round differently; a wrong mask or cap is O(1) off
    assert logits.shape == ref_logits.shape
    assert rel_err(logits, ref_logits) < 3e-2, rel_err(logits, ref_logits)
    g_outs, _, g_batch = run(backend, graphs=True)
    same = sum(a.output_ids == b.output_ids
               for a, b in zip(g_batch + g_outs, ref_batch + ref_outs))
    assert same >= 2 * len(prompts) - 2, same  # bf16 near-ties may flip a late token
