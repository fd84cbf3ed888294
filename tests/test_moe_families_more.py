"""The MoE families transformers has no code for (Grok-1, XVERSE-MoE, DeepSeek V1) through the
whole engine (`asgl.LLM`), against the float32 torch references of tests/moe_references.py
(each a transcription of the published modelling file, cited there).

As tests/test_moe_families.py does for the others: a tiny random checkpoint written in the
published layout (one tensor per expert and projection, the published names, a config.json
with the published `model_type` and `auto_map`, no remote code beside it: the loader reads it
as a plain config), served in float32 on the CPU with 8-token prefill chunks; every logits
row within 1e-4 relative of the reference's, greedy tokens equal (up to a near-tie), a second
prompt served partly from the radix cache, and every checkpoint tensor consumed by our loader
(tests/family_harness.py).
"""

from __future__ import annotations

import pytest
import torch

from family_harness import (CHUNK, EOS, MAX_NEW, VOCAB, LogitsTap, check_billions,
                            check_every_tensor_consumed, check_through_engine, checkpoint_names,
                            first_prompt, hf_greedy, hf_logits, make_family_llm, meta_model)
from helpers import rel_err
from moe_references import DeepseekV1Reference, Grok1Reference, XverseMoeReference
from tests.conftest import make_llm

_BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
             eos_token_id=EOS, pad_token_id=0)

FAMILIES = {
    # 8 experts top-2 (not renormalized) with GELU; the sandwich norms; multipliers on the
    # embeddings, the attention scores and the logits. The attention soft-cap is 30 in the
    # published config; 1.0 here so that it bites at these weights, and the score multiplier
    # differs from head_dim ** -0.5 so that a wrong scale shows.
    "grok1": (Grok1Reference, dict(
        _BASE, architectures=["Grok1ModelForCausalLM"], model_type="grok-1",
        auto_map={"AutoConfig": "configuration_grok1.Grok1Config",
                  "AutoModelForCausalLM": "modeling_grok1.Grok1ModelForCausalLM"},
        intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        attn_output_multiplier=0.4, max_attn_value=1.0,
        embedding_multiplier_scale=78.38367176906169, output_multiplier_scale=0.5773502691896257,
        rms_norm_eps=1e-5, tie_word_embeddings=True)),
    # router `mlp.router`, top-3 of 8 not renormalized, 2 shared experts fused in one MLP
    "xverse_moe": (XverseMoeReference, dict(
        _BASE, architectures=["XverseMoeForCausalLM"], model_type="xverse",
        auto_map={"AutoConfig": "configuration_xverse.XverseConfig",
                  "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM"},
        hidden_act="silu", intermediate_size=32, num_experts=8, moe_top_k=3,
        num_shared_experts=2, rms_norm_eps=1e-6, rope_theta=500000.0,
        tie_word_embeddings=False)),
    # layer 0 dense (first_k_dense_replace), then MoE every 2nd layer (moe_layer_freq):
    # layers 2 and 4 sparse, 1 and 3 dense; top-3 of 8 not renormalized + 2 shared experts
    "deepseek_v1": (DeepseekV1Reference, dict(
        _BASE, architectures=["DeepseekForCausalLM"], model_type="deepseek",
        auto_map={"AutoConfig": "configuration_deepseek.DeepseekConfig",
                  "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
        num_hidden_layers=5, hidden_act="silu", intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, first_k_dense_replace=1, moe_layer_freq=2,
        norm_topk_prob=False, scoring_func="softmax", attention_bias=False,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
        tie_word_embeddings=False)),
}


# + Grok-1's GELU experts in the Triton grouped GEMM (under the interpreter on the CPU)
CASES = [(f, False) for f in FAMILIES] + [("grok1", True)]


@pytest.mark.parametrize("family,triton_experts", CASES,
                         ids=[f + ("-triton" if t else "") for f, t in CASES])
def test_moe_family_matches_reference_through_engine(family, triton_experts, tmp_path,
                                                     monkeypatch):
    if triton_experts:
        pytest.importorskip("triton")
        from asgl.kernels.triton import fused_moe as kernel
        from asgl.layers.moe import fused_moe
        monkeypatch.setattr(fused_moe, "use_fused", lambda x: True)
        calls, inner = [], kernel.fused_experts
        monkeypatch.setattr(kernel, "fused_experts",
                            lambda *a, **k: calls.append(k.get("activation")) or inner(*a, **k))
    cls, config = FAMILIES[family]
    ref = cls(config)
    prompt, gen = first_prompt()
    want_tokens, gaps = hf_greedy(ref, prompt, MAX_NEW)
    ref.save(str(tmp_path))
    names = checkpoint_names(tmp_path)
    assert any(".experts.1." in n for n in names)  # the published per-expert layout

    llm = make_family_llm(tmp_path, attention_backend="torch")
    try:
        model = llm.engine.runner.model
        assert type(model).__name__ == config["architectures"][0]
        moe_layers = [m for m in model.modules() if type(m).__name__ == "FusedMoE"]
        if family == "deepseek_v1":
            assert len(moe_layers) == 2  # layers 2 and 4
        else:
            assert len(moe_layers) == config["num_hidden_layers"]
        check_every_tensor_consumed(type(model), model.config, tmp_path, names)
        cold = check_through_engine(llm, lambda ids: hf_logits(ref, ids), prompt, want_tokens,
                                    gaps, gen, family)
        # float32 agreement is ~1e-7 here: 1e-5 still catches Grok's GELU in its tanh form
        assert rel_err(cold.got, cold.want) < 1e-5, rel_err(cold.got, cold.want)
        if triton_experts:  # every MoE layer of every step ran the kernel, with GELU
            assert len(calls) >= 2 * (len(prompt) // CHUNK + MAX_NEW), len(calls)
            assert set(calls) == {"gelu"}, set(calls)
    finally:
        llm.shutdown()


def test_reference_features_bite():
    """The settings the engine test relies on change the reference's output: the attention
    soft-cap (Grok-1), the renormalization the families do not do, the shared experts."""
    ids = torch.randint(2, VOCAB - 1, (1, 12), generator=torch.Generator().manual_seed(3))
    for family, change in [("grok1", {"max_attn_value": 1e4}),
                           ("xverse_moe", {"norm_topk_prob": True}),
                           ("deepseek_v1", {"norm_topk_prob": True})]:
        cls, config = FAMILIES[family]
        base = cls(config)(ids).logits
        other = cls({**config, **change})(ids).logits
        assert rel_err(other, base) > 1e-3, family
    cls, config = FAMILIES["xverse_moe"]
    ref = cls(config)
    base = ref(ids).logits
    for name in [n for n in ref.w if ".shared_experts.down_proj" in n]:
        ref.w[name] = torch.zeros_like(ref.w[name])
    assert rel_err(ref(ids).logits, base) > 1e-3


# Published parameter counts (model cards), in billions: the dummy presets have the real shapes.
PRESET_SIZES = {"grok-1": 314.0, "deepseek-moe-16b-base": 16.4}


@pytest.mark.parametrize("name", list(PRESET_SIZES))
def test_dummy_moe_preset_shapes(name):
    from asgl.models import presets

    check_billions(meta_model(presets.get_preset(name).hf_config()), PRESET_SIZES[name])


def test_registry_names():
    from asgl.models.registry import get_model_class

    grok = get_model_class(["Grok1ModelForCausalLM"])
    assert issubclass(get_model_class(["Grok1ForCausalLM"]), grok)
    assert get_model_class(["XverseMoeForCausalLM"]).__name__ == "XverseMoeForCausalLM"
    assert get_model_class(["DeepseekForCausalLM"]).__name__ == "DeepseekForCausalLM"


def test_plain_config_only_for_our_architectures(tmp_path):
    """config.json of a model_type transformers lacks is read as a plain config only when we
    serve its architecture; a known model_type stays with transformers' own class."""
    import json

    from asgl.models.loader import _native_remote_config as _plain_config

    def write(**fields):
        (tmp_path / "config.json").write_text(json.dumps(fields))
        return _plain_config(str(tmp_path))

    config = write(**FAMILIES["deepseek_v1"][1])
    assert config.n_routed_experts == 8 and config.first_k_dense_replace == 1
    assert write(architectures=["SomethingElseForCausalLM"], model_type="something") is None
    assert write(architectures=["LlamaForCausalLM"], model_type="llama") is None


# ---------------------------------------------------------------------------- CUDA
# Each family in bf16 on the GPU (Triton experts, CUDA graphs for decode, chunked prefill, a
# radix hit) against the float32 reference, at head dim 128 (the FlashInfer module
# bench/gpu_suite.sh carries prebuilt).
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gpu_bf16_matches_reference(family, tmp_path):
    cls, config = FAMILIES[family]
    config = {**config, "hidden_size": 1024, "num_attention_heads": 8}
    ref = cls(config)
    ref.save(str(tmp_path))
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, VOCAB - 1, (n,), generator=gen).tolist() for n in (150, 40)]
    prompts.append(prompts[0][:120] + prompts[1][:20])  # radix hit
    llm = make_llm(model_path=str(tmp_path), dtype="bfloat16", device="cuda",
                   chunked_prefill_size=64, max_total_tokens=4096, context_length=512,
                   skip_tokenizer_init=True)
    try:
        tap = LogitsTap(llm.engine.runner.model)
        params = {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True}
        for i, prompt in enumerate(prompts):
            out = llm.generate(prompt, params)
            if i == 2:
                assert out.cached_tokens >= 64, out.cached_tokens
            # the rows of the prompt's last token and of each decode step
            want = hf_logits(ref, prompt + out.output_ids[:-1])[len(prompt) - 1:]
            got = tap.take()[-want.shape[0]:].float().cpu()
            assert rel_err(got, want) < 5e-2, (family, i, rel_err(got, want))
            last = want[0]
            top2 = torch.topk(last, 2).values
            if float(top2[0] - top2[1]) > 0.05:
                assert out.output_ids[0] == int(last.argmax()), (family, i)
    finally:
        llm.shutdown()
