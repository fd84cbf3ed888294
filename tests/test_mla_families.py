"""MLA families (DeepSeek V2 / V3 with dense layers, MiniCPM 3) against HF transformers on
tiny random configs, through the whole engine (`asgl.LLM`), float32 on the CPU.

As tests/test_model_families.py does for the dense families: chunked prefill (chunks of 8),
every logits row within 1e-4 relative of HF's, greedy tokens equal to HF's (up to a
near-tie), a second prompt served partly from the radix cache. The KV pool is the latent
one (LatentKVPool), so decode runs the absorbed form and prefill the expanded form (torch
backend) or the absorbed form everywhere (triton backend under TRITON_INTERPRET).
Also: every tensor of a checkpoint in the published layout is consumed by the loader.
The checks shared with the other family tests live in tests/family_harness.py.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers

from family_harness import (EOS, MAX_NEW, VOCAB, check_billions, check_every_tensor_consumed,
                            check_hf_tp2, check_through_engine, checkpoint_names, first_prompt,
                            hf_greedy, hf_logits, make_family_llm, meta_model, random_hf_model)

MLA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24,
           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
           max_position_embeddings=256, initializer_range=0.1, bos_token_id=1,
           eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-6)
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
            mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1, rope_theta=10000.0)

# layer 0 dense, layer 1 MoE (routed + shared experts), as DeepSeek's first_k_dense_replace
MOE = dict(first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
           moe_intermediate_size=16, n_shared_experts=1)
FAMILIES = {
    # V2-Lite: q_proj (no q LoRA), plain softmax top-k scaled by routed_scaling_factor
    "deepseek_v2_lite": ("DeepseekV2Config", dict(MOE, q_lora_rank=None, topk_method="greedy",
                                                  routed_scaling_factor=1.5)),
    # V2: q LoRA, YaRN (mscale on the softmax), group-limited top-k (group max), biases
    "deepseek_v2_yarn": ("DeepseekV2Config", dict(MOE, topk_method="group_limited_greedy",
                                                  n_group=2, topk_group=1,
                                                  routed_scaling_factor=2.0,
                                                  attention_bias=True, rope_parameters=YARN)),
    # V3: sigmoid scores, correction bias, group top-2 sums, renormalized then scaled
    "deepseek_v3": ("DeepseekV3Config", dict(MOE, n_group=4, topk_group=2,
                                             routed_scaling_factor=2.5, norm_topk_prob=True,
                                             rope_interleave=True)),
    "deepseek_v3_neox": ("DeepseekV3Config", dict(MOE, n_group=1, topk_group=1,
                                                  norm_topk_prob=False, rope_interleave=False)),
    "minicpm3": ("MiniCPM3Config", dict(scale_emb=3.0, scale_depth=1.4, dim_model_base=16,
                                        tie_word_embeddings=True)),
}


def _hf_model(family: str):
    cls_name, extra = FAMILIES[family]
    model = random_hf_model(getattr(transformers, cls_name)(**{**MLA, **extra}))
    with torch.no_grad():
        for name, b in model.named_buffers():  # V3's expert correction bias: make it count
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.3)
    return model


CASES = [(f, "torch") for f in FAMILIES] + [("deepseek_v2_yarn", "triton")]


@pytest.mark.parametrize("family,backend", CASES, ids=[f"{f}-{b}" for f, b in CASES])
def test_mla_family_matches_hf_through_engine(family, backend, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    hf = _hf_model(family)
    prompt, gen = first_prompt()
    ref, gaps = hf_greedy(hf, prompt, MAX_NEW)
    hf.save_pretrained(tmp_path)
    names = checkpoint_names(tmp_path)
    if family.startswith("deepseek"):  # the published per-expert layout, V3's bias
        assert any(".mlp.experts.7.down_proj." in n for n in names)
        assert any(n.endswith("e_score_correction_bias") for n in names) == ("v3" in family)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    llm = make_family_llm(tmp_path, attention_backend=backend)
    try:
        runner = llm.engine.runner
        # (minicpm3 has no experts)
        check_every_tensor_consumed(type(runner.model), hf.config, tmp_path, names,
                                    require_experts=False)
        assert type(runner.kv_pool).__name__ == "LatentKVPool"
        latent_dim = MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]
        assert runner.kv_pool.get_latent(0).shape[-1] == latent_dim
        # the start-up line states the pool's size as the latent predicts (float32: 4 bytes)
        per_token = MLA["num_hidden_layers"] * (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]) * 4
        assert any(f"{per_token} bytes per token (MLA latent" in r.getMessage()
                   and f"= {(1 << 30) // per_token} tokens per GiB" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        check_through_engine(llm, lambda ids: hf_logits(hf, ids), prompt, ref, gaps, gen,
                             family)
    finally:
        llm.shutdown()


# Published parameter counts (model cards), in billions; V3 without its MTP layer.
PRESETS = {"deepseek-v2-lite": 15.7, "deepseek-v3": 671.0}


@pytest.mark.parametrize("name", list(PRESETS))
def test_mla_preset_shapes_and_latent_kv_size(name):
    """The dummy presets have the published shapes, and their KV pool stores the latent:
    layers x (kv_lora_rank + rope) values per token (V2-Lite bf16: 31,104 bytes, 34,521
    tokens per GiB, vs 276,480 bytes for the expanded K/V)."""
    from asgl.engine.worker.latent_kv_cache import kv_bytes_per_token
    from asgl.models import presets

    config = presets.get_preset(name).hf_config()
    model = meta_model(config)
    check_billions(model, PRESETS[name], tolerance=0.005)
    per_token = kv_bytes_per_token(model, torch.bfloat16)
    assert per_token == config.num_hidden_layers * (512 + 64) * 2
    if name == "deepseek-v2-lite":
        assert (1 << 30) // per_token == 34521


def test_mla_tensor_parallel_2_ranks_match_hf(tmp_path):
    """Two gloo ranks, each with half the heads (q / kv_b / o projections sharded by head,
    the latent projection and the latent pool replicated) and, for V3, half of every
    expert's intermediate dimension: mixed steps (chunks, decodes) against transformers."""
    check_hf_tp2(tmp_path, _hf_model, ["deepseek_v3", "minicpm3"])
