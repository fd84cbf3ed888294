"""`--model-impl`: transformers' modelling code with asgl attention (transformers_fallback.py).

The headline case: `asgl serve` on a tiny random Olmo 3 (an architecture transformers has
and asgl has no file for; sliding-window layers with q/k norms over all heads; or the next
candidate of `UNKNOWN` once Olmo 3 has a native file) falls back
on its own (logged), serves 8 concurrent greedy requests equal to transformers' own greedy
decoding (eager attention, full forward per step), and a request repeating a prefix is
served partly from the radix cache (meta_info.cached_tokens > 0).
"""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers

from asgl.config import EngineConfig
from tests.conftest import make_llm, reference_threads
from server_fixture import ServerProcess, free_port

VOCAB = 160
EOS = VOCAB - 1
MAX_NEW = 8
TIE_GAP = 1e-3
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
            bos_token_id=1, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False)


def _save(config, path) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # HF inits norms to one: make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model = model.float().eval()
    model.save_pretrained(path)
    return model


# Architectures transformers has and asgl (so far) does not: the first one still without a
# native file is the fallback's test subject (a native file added later moves it on).
UNKNOWN = [
    # 4 layers: 3 sliding (window 6) + 1 full, the default Olmo 3 pattern; q/k norms
    ("Olmo3ForCausalLM", "Olmo3Config", dict(num_hidden_layers=4, sliding_window=6)),
    ("Ernie4_5ForCausalLM", "Ernie4_5Config", dict(num_hidden_layers=2, head_dim=16)),
    ("SmolLM3ForCausalLM", "SmolLM3Config", dict(num_hidden_layers=4, no_rope_layer_interval=2)),
]


def _unknown(path) -> tuple[str, transformers.PreTrainedModel]:
    from asgl.models.registry import supported_architectures

    for arch, cls, extra in UNKNOWN:
        if arch not in supported_architectures():
            return arch, _save(getattr(transformers, cls)(**TINY, **extra), path)
    pytest.skip("every candidate architecture has a native file now")


def _hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    ids, gaps = list(prompt), []
    with torch.no_grad(), reference_threads():
        for _ in range(n):
            last = model(torch.tensor([ids])).logits[0, -1].float()
            top2 = torch.topk(last, 2).values
            gaps.append(float(top2[0] - top2[1]))
            ids.append(int(last.argmax()))
    return ids[len(prompt):], gaps


def _check_greedy(got: list[int], ref: list[int], gaps: list[float], what: str) -> None:
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:  # only after a near-tie (batched fp32 matmuls differ in the last bits)
            assert gaps[i] < TIE_GAP, f"{what}: token {i} {a} != HF {b}\n{got}\n{ref}"
            return
    assert got == ref, (what, got, ref)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_serve_falls_back_to_transformers(tmp_path):
    arch, hf = _unknown(tmp_path)
    gen = torch.Generator().manual_seed(3)
    shared = torch.randint(2, VOCAB - 1, (16,), generator=gen).tolist()
    prompts = [torch.randint(2, VOCAB - 1, (int(n),), generator=gen).tolist()
               for n in torch.randint(9, 30, (6,), generator=gen)]
    prompts += [shared + [5, 9, 11], shared + [7]]  # the last two repeat a cached prefix
    refs = [_hf_greedy(hf, p, MAX_NEW) for p in prompts]

    server = ServerProcess(["--model-path", str(tmp_path), "--dtype", "float32",
                            "--device", "cpu", "--skip-tokenizer-init",
                            "--chunked-prefill-size", "8"], free_port())
    try:
        server.wait_ready()
        url = server.url + "/generate"  # token ids in and out (the model has no tokenizer)
        greedy = dict(temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True)
        # the shared prefix goes in first, so the radix cache holds it
        _post(url, {"input_ids": shared + [3], "sampling_params": {**greedy, "max_new_tokens": 1}})
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(
                lambda p: _post(url, {"input_ids": p, "sampling_params": greedy}), prompts))
        for i, (out, (ref, gaps)) in enumerate(zip(outs, refs)):
            _check_greedy(out["output_ids"], ref, gaps, f"request {i}")
        cached = [o["meta_info"]["cached_tokens"] for o in outs]
        assert cached[-1] >= 8 and cached[-2] >= 8, cached
        log = server.log()
        assert "no native asgl implementation: falling back to the transformers" in log, log
        server.assert_no_leak()
        server.assert_clean_log()
    finally:
        server.stop()


def _engine(path, **kw):
    return make_llm(model_path=str(path), dtype="float32", device="cpu", chunked_prefill_size=8,
                    skip_tokenizer_init=True, max_total_tokens=1024,
                    disable_overlap_schedule=True, **kw)


@pytest.mark.parametrize("impl", ["native", "sglang"])
def test_native_refuses_an_unknown_architecture(impl, tmp_path):
    arch, _ = _unknown(tmp_path)
    with pytest.raises(Exception, match=f"{arch}.*is not supported"):
        _engine(tmp_path, model_impl=impl)


def test_transformers_impl_on_a_native_architecture(tmp_path):
    """`--model-impl transformers` on Llama (which has a native file) matches HF and the
    native implementation; a chunked prompt and a radix hit go through HF's code too."""
    from asgl.models.transformers_fallback import TransformersForCausalLM

    hf = _save(transformers.LlamaConfig(**TINY, num_hidden_layers=2), tmp_path)
    prompt = torch.randint(2, VOCAB - 1, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    ref, gaps = _hf_greedy(hf, prompt, MAX_NEW)
    params = {"temperature": 0.0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    llm = _engine(tmp_path, model_impl="transformers")
    try:
        assert isinstance(llm.engine.runner.model, TransformersForCausalLM)
        _check_greedy(llm.generate(prompt, params).output_ids, ref, gaps, "transformers impl")
        again = llm.generate(prompt[:16] + [3, 4], params)
        assert again.cached_tokens >= 8
        _check_greedy(again.output_ids, *_hf_greedy(hf, prompt[:16] + [3, 4], MAX_NEW), "hit")
    finally:
        llm.shutdown()


def test_model_impl_flag_parses():
    assert EngineConfig.from_cli(["--model-impl", "transformers"]).model_impl == "transformers"
    assert EngineConfig().model_impl == "auto"
    assert EngineConfig.from_cli(["--model-impl", "sglang"]).model_impl == "sglang"  # = native
    with pytest.raises(SystemExit):
        EngineConfig.from_cli(["--model-impl", "vllm"])


def test_transformers_impl_loads_converted_checkpoints(tmp_path):
    """A checkpoint whose tensor names transformers 5 converts on load (a GLM-4 MoE: one
    tensor per expert on disk, the experts fused in the model) goes through transformers'
    own loading, and serves equal to transformers."""
    config = transformers.Glm4MoeConfig(
        **{**TINY, "num_hidden_layers": 2, "head_dim": 16}, moe_intermediate_size=32,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        partial_rotary_factor=0.5, n_group=1, topk_group=1)
    hf = _save(config, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert any(".experts.0." in name for name in f.keys())  # per-expert on disk
    prompt = torch.randint(2, VOCAB - 1, (21,), generator=torch.Generator().manual_seed(2)).tolist()
    llm = _engine(tmp_path, model_impl="transformers")
    try:
        out = llm.generate(prompt, {"temperature": 0.0, "max_new_tokens": MAX_NEW,
                                    "ignore_eos": True})
        _check_greedy(out.output_ids, *_hf_greedy(hf, prompt, MAX_NEW), "glm4_moe")
    finally:
        llm.shutdown()


def test_exaone_saved_by_transformers_runs_natively(tmp_path):
    """transformers 5 saves Exaone with `LlamaForCausalLM` in config.json and Exaone's own
    tensor names: the native Exaone file serves it."""
    from asgl.models.exaone import ExaoneForCausalLM

    hf = _save(transformers.ExaoneConfig(**TINY, num_layers=2), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"]
    prompt = torch.randint(2, VOCAB - 1, (21,), generator=torch.Generator().manual_seed(4)).tolist()
    llm = _engine(tmp_path, model_impl="native")
    try:
        assert isinstance(llm.engine.runner.model, ExaoneForCausalLM)
        out = llm.generate(prompt, {"temperature": 0.0, "max_new_tokens": MAX_NEW,
                                    "ignore_eos": True})
        _check_greedy(out.output_ids, *_hf_greedy(hf, prompt, MAX_NEW), "exaone")
    finally:
        llm.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_transformers_impl_with_graphs(tmp_path):
    """On a GPU: transformers' Llama through FlashInfer with CUDA graphs gives the native
    implementation's greedy tokens (bf16; near-ties may flip a late token)."""
    pytest.importorskip("flashinfer")
    _save(transformers.LlamaConfig(**TINY, num_hidden_layers=2), tmp_path)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, VOCAB - 1, (n,), generator=gen).tolist() for n in (100, 40, 3)]
    params = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}
    outs = {}
    for impl in ("native", "transformers"):
        llm = make_llm(model_path=str(tmp_path), dtype="bfloat16", device="cuda",
                       model_impl=impl, skip_tokenizer_init=True, max_total_tokens=4096,
                       context_length=256)
        try:
            assert type(llm.engine.runner.attn_backend).name == "flashinfer"
            assert llm.engine.runner.graph_runner is not None  # captured
            outs[impl] = [o.output_ids for o in llm.generate(prompts, params)]
        finally:
            llm.shutdown()
    assert [o[0] for o in outs["native"]] == [o[0] for o in outs["transformers"]]
    assert sum(a == b for a, b in zip(outs["native"], outs["transformers"])) >= 2


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_transformers_impl_passes_the_attention_variants(family, tmp_path):
    """transformers' own Gemma 2 (soft-cap, windows, query_pre_attn_scalar, final logit cap),
    Cohere (logit_scale) and Granite (multipliers, logits_scaling) through asgl attention:
    every prompt row's logits within 1e-4 of transformers, and its greedy tokens."""
    import test_model_families as dense
    from helpers import rel_err

    hf = dense._hf_model(family)
    hf.save_pretrained(tmp_path)
    prompt = torch.randint(2, VOCAB - 1, (21,), generator=torch.Generator().manual_seed(6)).tolist()
    llm = _engine(tmp_path, model_impl="transformers")
    try:
        tap = dense._LogitsTap(llm.engine.runner.model)
        out = llm.generate(prompt, {"temperature": 0.0, "max_new_tokens": MAX_NEW,
                                    "ignore_eos": True}, return_logprob=True, logprob_start_len=0)
        _check_greedy(out.output_ids, *_hf_greedy(hf, prompt, MAX_NEW), family)
        got, want = tap.take()[:len(prompt)], dense._hf_logits(hf, prompt)
        assert rel_err(got, want) < 1e-4, rel_err(got, want)
    finally:
        llm.shutdown()
