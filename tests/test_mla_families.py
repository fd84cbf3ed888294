"""MLA families (DeepSeek V2 / V3 with dense layers, MiniCPM 3) against HF transformers on
tiny random configs, through the whole engine (`asgl.LLM`), float32 on the CPU.

As tests/test_model_families.py does for the dense families: chunked prefill (chunks of 8),
every logits row within 1e-4 relative of HF's, greedy tokens equal to HF's (up to a
near-tie), a second prompt served partly from the radix cache. The KV pool is the latent
one (LatentKVPool), so decode runs the absorbed form and prefill the expanded form (torch
backend) or the absorbed form everywhere (triton backend under TRITON_INTERPRET).
Also: every tensor of a checkpoint in the published layout is consumed by the loader.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from safetensors import safe_open

from helpers import rel_err
from tests.conftest import make_llm, reference_threads
from tests.test_model_families import _check_greedy, _hf_greedy, _hf_logits, _LogitsTap

VOCAB = 160
EOS = VOCAB - 1
CHUNK = 8
MAX_NEW = 6
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
    config = getattr(transformers, cls_name)(**{**MLA, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # HF zero-inits biases and norm offsets: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
        for name, b in model.named_buffers():  # V3's expert correction bias: make it count
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.3)
    return model.float().eval()


def _check_every_tensor_consumed(cls, config, path, names: list[str]) -> None:
    """Loading the checkpoint into a fresh model maps every stored tensor to a parameter
    (`assign_weights` raises on a tensor without one and on a parameter left unfilled;
    `FusedMoE` on an expert left half loaded), and the expert tensors fill the stacked
    expert weights exactly."""
    model = cls(config)
    seen: list[str] = []
    inner = model._map_weights

    def spy(weights):
        for item in inner(weights):
            seen.append(item[0])
            yield item
    model._map_weights = spy
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {n: f.get_tensor(n) for n in names}
    model.load_weights(tensors.items())
    assert sorted(seen) == sorted(names)
    stored = sum(t.numel() for n, t in tensors.items() if ".experts." in n)
    ours = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert ours == stored


CASES = [(f, "torch") for f in FAMILIES] + [("deepseek_v2_yarn", "triton")]


@pytest.mark.parametrize("family,backend", CASES, ids=[f"{f}-{b}" for f, b in CASES])
def test_mla_family_matches_hf_through_engine(family, backend, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    hf = _hf_model(family)
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(2, VOCAB - 1, (21,), generator=gen).tolist()
    ref, gaps = _hf_greedy(hf, prompt, MAX_NEW)
    hf.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    if family.startswith("deepseek"):  # the published per-expert layout, V3's bias
        assert any(".mlp.experts.7.down_proj." in n for n in names)
        assert any(n.endswith("e_score_correction_bias") for n in names) == ("v3" in family)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    llm = make_llm(model_path=str(tmp_path), dtype="float32", device="cpu",
                   chunked_prefill_size=CHUNK, skip_tokenizer_init=True, max_total_tokens=1024,
                   disable_overlap_schedule=True, attention_backend=backend)
    try:
        runner = llm.engine.runner
        _check_every_tensor_consumed(type(runner.model), hf.config, tmp_path, names)
        assert type(runner.kv_pool).__name__ == "LatentKVPool"
        latent_dim = MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]
        assert runner.kv_pool.get_latent(0).shape[-1] == latent_dim
        # the start-up line states the pool's size as the latent predicts (float32: 4 bytes)
        per_token = MLA["num_hidden_layers"] * (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]) * 4
        assert any(f"{per_token} bytes per token (MLA latent" in r.getMessage()
                   and f"= {(1 << 30) // per_token} tokens per GiB" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        tap = _LogitsTap(runner.model)
        greedy = {"temperature": 0.0, "max_new_tokens": MAX_NEW, "ignore_eos": True}

        out = llm.generate(prompt, greedy, return_logprob=True, logprob_start_len=0)
        agree = _check_greedy(out.output_ids, ref, gaps, f"{family} cold")
        got = tap.take()
        want = _hf_logits(hf, (prompt + out.output_ids)[:-1])
        assert got.shape == want.shape, (got.shape, want.shape)
        n = len(prompt) + agree
        assert rel_err(got[:n], want[:n]) < 1e-4, rel_err(got[:n], want[:n])

        prompt2 = prompt[:16] + torch.randint(2, VOCAB - 1, (7,), generator=gen).tolist()
        ref2, gaps2 = _hf_greedy(hf, prompt2, MAX_NEW)
        out2 = llm.generate(prompt2, greedy)
        assert out2.cached_tokens >= CHUNK, out2.cached_tokens
        agree2 = _check_greedy(out2.output_ids, ref2, gaps2, f"{family} cached")
        got2 = tap.take()
        want2 = _hf_logits(hf, prompt2 + out2.output_ids[:-1])[len(prompt2) - 1:]
        assert got2.shape == want2.shape
        assert rel_err(got2[:agree2 + 1], want2[:agree2 + 1]) < 1e-4
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
    from asgl.models.registry import get_model_class

    config = presets.get_preset(name).hf_config()
    with torch.device("meta"):
        model = get_model_class(config.architectures)(config)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(billions - PRESETS[name]) / PRESETS[name] < 0.005, billions
    per_token = kv_bytes_per_token(model, torch.bfloat16)
    assert per_token == config.num_hidden_layers * (512 + 64) * 2
    if name == "deepseek-v2-lite":
        assert (1 << 30) // per_token == 34521


def test_mla_tensor_parallel_2_ranks_match_hf(tmp_path):
    """Two gloo ranks, each with half the heads (q / kv_b / o projections sharded by head,
    the latent projection and the latent pool replicated) and, for V3, half of every
    expert's intermediate dimension: mixed steps (chunks, decodes) against transformers."""
    from types import SimpleNamespace

    from asgl.models.registry import get_model_class
    from helpers import tp_worker

    plans = [[10, 7, 1, 1], [6, 1, 1, 1], [0, 9, 1, 1]]
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(2, VOCAB - 1, (sum(p),), generator=gen).tolist() for p in plans]
    families = ["deepseek_v3", "minicpm3"]
    jobs, refs = [], []
    for family in families:
        hf = _hf_model(family)
        config = SimpleNamespace(**hf.config.to_dict())
        jobs.append((get_model_class([type(hf).__name__]), config, dict(hf.state_dict()),
                     plans, seqs))
        with reference_threads():
            refs.append([_hf_logits(hf, ids) for ids in seqs])
    out = tmp_path / "logits.pt"
    torch.multiprocessing.spawn(tp_worker, args=(2, str(tmp_path / "init"), jobs, str(out)),
                                nprocs=2, join=True)
    for family, got, ref in zip(families, torch.load(out), refs):
        for g, r in zip(got, ref):
            assert rel_err(g, r) < 1e-4, (family, rel_err(g, r))
