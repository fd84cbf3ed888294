"""MoE families against HF transformers, through the whole engine (`asgl.LLM`).

The checks of tests/test_model_families.py (tests/family_harness.py): a tiny random-weight
checkpoint written by `save_pretrained` in the published layout (one tensor per expert and
projection), served in float32 on the CPU with 8-token prefill chunks; every logits row
within 1e-4 relative of HF's, greedy tokens equal (up to a near-tie), a second prompt
served partly from the radix cache. Plus: every tensor of the checkpoint is consumed by
our loader (`assign_weights` refuses a tensor without a parameter and a parameter
without a tensor; here the count is checked too), and the MoE layer alone matches HF's
router + experts module on the same weights.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from family_harness import (CHUNK, EOS, MAX_NEW, VOCAB, LogitsTap, check_billions,
                            check_cold_prompt, check_every_tensor_consumed, check_hf_tp2,
                            check_through_engine, checkpoint_names, finish_gguf, first_prompt,
                            gguf_base_ints, gguf_tensor_name, hf_greedy, hf_logits, make_family_llm,
                            meta_model, random_hf_model)
from helpers import rel_err
from tests.conftest import make_llm
from tests.test_model_families import TINY

MOE = {
    # 4 experts, top-2, renormalized
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None)),
    # shared expert with its sigmoid gate, top-k not renormalized, layer 0 dense
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=6, num_experts_per_tok=2,
                                         moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48,
                                         norm_topk_prob=False, mlp_only_layers=[0],
                                         num_hidden_layers=3)),
    # per-head q/k norms, top-3 of 8 renormalized
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=3,
                                         moe_intermediate_size=32, norm_topk_prob=True,
                                         rms_norm_eps=1e-6)),
    # q/k norm over all heads, top-2 of 8 not renormalized
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32,
                                  norm_topk_prob=False)),
    # fused Wqkv clipped (clip 0.3 bites at these weights), stacked experts with w2
    # transposed, top-2 of 4 divided by their 2-norm, bias-free LayerNorm
    "dbrx": ("DbrxConfig", dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                                attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=0.3),
                                ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4,
                                                moe_top_k=2, moe_normalize_expert_weights=2.0))),
}
_NOT_DBRX = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings"}


def _hf_moe(family: str):
    cls_name, extra = MOE[family]
    base = {k: v for k, v in TINY.items() if k not in _NOT_DBRX} if family == "dbrx" else TINY
    return random_hf_model(getattr(transformers, cls_name)(**{**base, **extra}))


# the Triton grouped GEMM in the engine (under the interpreter on the CPU, float32)
CASES = [(f, False) for f in MOE] + [("qwen3_moe", True)]


@pytest.mark.parametrize("family,triton_experts", CASES,
                         ids=[f + ("-triton" if t else "") for f, t in CASES])
def test_moe_family_matches_hf_through_engine(family, triton_experts, tmp_path, monkeypatch):
    if triton_experts:
        pytest.importorskip("triton")
        from asgl.kernels.triton import fused_moe as kernel
        from asgl.layers.moe import fused_moe
        monkeypatch.setattr(fused_moe, "use_fused", lambda x: True)
        calls, inner = [], kernel.fused_experts
        monkeypatch.setattr(kernel, "fused_experts",
                            lambda *a, **k: calls.append(a[0].shape[0]) or inner(*a, **k))
    hf = _hf_moe(family)
    prompt, gen = first_prompt()
    ref, gaps = hf_greedy(hf, prompt, MAX_NEW)
    hf.save_pretrained(tmp_path)
    names = checkpoint_names(tmp_path)
    if family != "dbrx":
        assert any(".experts.1." in n for n in names)  # the published per-expert layout

    llm = make_family_llm(tmp_path, attention_backend="torch")
    try:
        model = llm.engine.runner.model
        experts = [m for m in model.modules() if type(m).__name__ == "FusedMoE"]
        assert experts, "no MoE layer built"
        check_every_tensor_consumed(type(model), hf.config, tmp_path, names)
        check_through_engine(llm, lambda ids: hf_logits(hf, ids), prompt, ref, gaps, gen,
                             family)
        if triton_experts:  # every MoE layer of every step ran the kernel
            assert len(calls) >= 2 * (len(prompt) // CHUNK + MAX_NEW), len(calls)
    finally:
        llm.shutdown()


# Published parameter counts (model cards), in billions: the dummy presets have the real shapes.
PRESET_SIZES = {"mixtral-8x7b": 46.7, "qwen3-30b-a3b": 30.5}


@pytest.mark.parametrize("name", list(PRESET_SIZES))
def test_dummy_moe_preset_shapes(name):
    from asgl.models import presets

    check_billions(meta_model(presets.get_preset(name).hf_config()), PRESET_SIZES[name])


def test_tensor_parallel_2_ranks_match_hf(tmp_path):
    """Two gloo ranks, each with half of every expert's intermediate dim (and half the
    shared expert's), loaded from transformers 5's in-memory state dict (stacked expert
    tensors, shard id None): logits equal HF's."""
    check_hf_tp2(tmp_path, _hf_moe, ["qwen2_moe", "qwen3_moe"],
                 [[10, 7, 1, 1], [6, 1, 1, 1]])


# ---------------------------------------------------------------------------- CUDA
# The Triton experts in bf16 with CUDA graphs (decode) and chunked prefill against the
# torch experts on the same GPU (bf16 too), on a Qwen3-MoE shape with 64 experts, top-8
# (head dim 128: the FlashInfer module bench/gpu_suite.sh carries prebuilt).
GPU_QWEN3_MOE = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024,
                     moe_intermediate_size=256, num_experts=64, num_experts_per_tok=8,
                     norm_topk_prob=True, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=128, max_position_embeddings=1024,
                     initializer_range=0.05, rms_norm_eps=1e-6, bos_token_id=1,
                     eos_token_id=EOS, pad_token_id=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_triton_experts_match_torch_experts(tmp_path, monkeypatch):
    from asgl.layers.moe import fused_moe

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**GPU_QWEN3_MOE))
    hf.save_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, VOCAB - 1, (n,), generator=gen).tolist() for n in (150, 90, 3)]
    prompts.append(prompts[0][:120] + prompts[1][:20])  # radix hit
    params = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}

    def run(triton_experts: bool, graphs: bool):
        monkeypatch.setattr(fused_moe, "use_fused",
                            (lambda x: x.is_cuda) if triton_experts else (lambda x: False))
        llm = make_llm(model_path=str(tmp_path), dtype="bfloat16", device="cuda",
                       chunked_prefill_size=64, max_total_tokens=4096, context_length=512,
                       disable_cuda_graph=not graphs, skip_tokenizer_init=True)
        try:
            tap = LogitsTap(llm.engine.runner.model)
            outs = [llm.generate(p, params) for p in prompts]
            logits = tap.take()
            batch = llm.generate(prompts, params)
            return outs, logits, batch
        finally:
            llm.shutdown()

    ref_outs, ref_logits, ref_batch = run(False, graphs=False)
    outs, logits, _ = run(True, graphs=False)
    assert outs[3].cached_tokens >= 64
    assert [o.output_ids[0] for o in outs] == [o.output_ids[0] for o in ref_outs]
    assert logits.shape == ref_logits.shape
    assert rel_err(logits, ref_logits) < 3e-2, rel_err(logits, ref_logits)
    g_outs, _, g_batch = run(True, graphs=True)
    same = sum(a.output_ids == b.output_ids
               for a, b in zip(g_batch + g_outs, ref_batch + ref_outs))
    assert same >= 2 * len(prompts) - 2, same  # bf16 near-ties may flip a late token


# ---------------------------------------------------------------------------- GGUF
# A tiny Qwen2-MoE / Qwen3-MoE GGUF written the way llama.cpp's converter writes one (each
# layer's experts stacked per projection, `ffn_{gate,up,down}_exps`, the router
# `ffn_gate_inp`, Qwen2-MoE's shared expert `*_shexp` with its gate squeezed to [H], the
# expert sizes in `expert_*` keys); transformers' own GGUF reader finds the model's
# tensors in it, and the engine serving the file matches the HF model it came from.
GGUF_MOE = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "llama": "mixtral"}
_GGUF_DENSE = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
               "mlp.shared_expert.up_proj": "ffn_up_shexp",
               "mlp.shared_expert.down_proj": "ffn_down_shexp",
               "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) interleaves the
    two rotary halves of each q/k head for its RoPE kernel."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _write_moe_gguf(hf, arch: str, path) -> None:
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    U32, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    mixtral = arch == "llama"
    moe_inter = c.intermediate_size if mixtral else c.moe_intermediate_size
    ints = gguf_base_ints(c) + [
        ("expert_count", c.num_local_experts if mixtral else c.num_experts),
        ("expert_used_count", c.num_experts_per_tok)]
    if not mixtral:
        ints.append(("expert_feed_forward_length", moe_inter))
    if arch == "qwen2moe":
        ints.append(("expert_shared_feed_forward_length", c.shared_expert_intermediate_size))
    for key, value in ints:
        w.add_key_value(f"{arch}.{key}", value, U32)
    w.add_key_value(f"{arch}.rope.freq_base", float(c.rope_parameters["rope_theta"]), F32)
    w.add_key_value(f"{arch}.attention.layer_norm_rms_epsilon", float(c.rms_norm_eps), F32)
    I = moe_inter
    for name, tensor in hf.state_dict().items():
        data = tensor.float()
        if mixtral and name.endswith("q_proj.weight"):
            data = _llama_cpp_permute(data, c.num_attention_heads)
        elif mixtral and name.endswith("k_proj.weight"):
            data = _llama_cpp_permute(data, c.num_key_value_heads)
        if name.endswith("experts.gate_up_proj"):  # HF stacks gate and up: llama.cpp doesn't
            blk = name.split(".")[2]
            w.add_tensor(f"blk.{blk}.ffn_gate_exps.weight", data[:, :I].contiguous().numpy())
            w.add_tensor(f"blk.{blk}.ffn_up_exps.weight", data[:, I:].contiguous().numpy())
            continue
        if name.endswith("experts.down_proj"):
            w.add_tensor(f"blk.{name.split('.')[2]}.ffn_down_exps.weight", data.numpy())
            continue
        gg = gguf_tensor_name(name, _GGUF_DENSE)
        if gg.endswith("ffn_gate_inp_shexp.weight"):
            data = data.reshape(-1)  # llama.cpp stores the [1, H] gate as [H]
        w.add_tensor(gg, data.numpy())
    finish_gguf(w)


@pytest.mark.parametrize("arch", list(GGUF_MOE))
def test_gguf_moe_matches_hf(arch, tmp_path, monkeypatch):
    from asgl.models import gguf_loader
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    family = GGUF_MOE[arch]
    extra = dict(MOE[family][1])
    if arch != "llama":
        extra["mlp_only_layers"] = []  # llama.cpp makes every layer sparse
        extra["norm_topk_prob"] = arch == "qwen3moe"  # llama.cpp's fixed choice per arch
    MOE[f"gguf-{arch}"] = (MOE[family][0], extra)
    try:
        hf = _hf_moe(f"gguf-{arch}")
    finally:
        del MOE[f"gguf-{arch}"]
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_moe_gguf(hf, arch, path)

    if arch != "llama":  # transformers reads MoE GGUFs of these (not Mixtral's)
        empty = transformers.AutoModelForCausalLM.from_config(hf.config)
        theirs = load_gguf_checkpoint(str(path), return_tensors=True,
                                      model_to_load=empty)["tensors"]
        ours = {k: v for k, v in hf.state_dict().items() if "rotary" not in k}
        assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
        for name, tensor in ours.items():
            torch.testing.assert_close(torch.as_tensor(theirs[name]).float(), tensor, msg=name)

    monkeypatch.setattr(gguf_loader, "_save_tokenizer", lambda *a, **k: None)
    monkeypatch.setenv("ASGL_CACHE_DIR", str(tmp_path / "cache"))
    prompt = torch.randint(2, VOCAB - 1, (21,), generator=torch.Generator().manual_seed(9)).tolist()
    llm = make_family_llm(path)
    try:
        assert any(type(m).__name__ == "FusedMoE" for m in llm.engine.runner.model.modules())
        check_cold_prompt(llm, hf, prompt, f"gguf {arch}")
    finally:
        llm.shutdown()
