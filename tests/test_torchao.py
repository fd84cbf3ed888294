"""`--torchao-config` with the torchao library: int8 weight-only layers compute with their
dequantized weights (greedy tokens equal a float32 HF model holding those weights, top-2-gap
rule), int8dq runs, int4wo says on the CPU that it needs CUDA."""

from __future__ import annotations

import pytest
import torch
import transformers

from fp8_checkpoints import tiny_model
from tests.conftest import make_llm

torchao = pytest.importorskip("torchao")

PROMPTS = [[5, 17, 33, 101, 7], [200, 3, 3, 9, 45, 61, 77, 12, 8]]
MAX_NEW = 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model()
    path = str(tmp_path_factory.mktemp("tao") / "f32")
    model.save_pretrained(path)
    return model, path


def _hf_state_from_ours(ours, base) -> dict:
    """Our fused layers' dequantized weights under HF's names."""
    state = dict(base.state_dict())
    cfg = base.config
    q = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    for i, layer in enumerate(ours.model.layers):
        def deq(mod):
            w = mod.weight
            return (w.dequantize() if hasattr(w, "dequantize") else w).float()
        qkv = deq(layer.self_attn.qkv_proj)
        gate_up = deq(layer.mlp.gate_up_proj)
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"], \
            state[p + "self_attn.v_proj.weight"] = qkv.split([q, kv, kv])
        state[p + "self_attn.o_proj.weight"] = deq(layer.self_attn.o_proj)
        state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"] = gate_up.chunk(2)
        state[p + "mlp.down_proj.weight"] = deq(layer.mlp.down_proj)
    return state


def test_int8wo_matches_dequantized_reference(checkpoint):
    base, path = checkpoint
    with make_llm(model_path=path, torchao_config="int8wo", skip_tokenizer_init=True,
                  max_total_tokens=1024) as llm:
        outs = llm.generate(PROMPTS, {"temperature": 0, "max_new_tokens": MAX_NEW,
                                      "ignore_eos": True})
        ours = llm.engine.runner.model
        assert "torchao int8wo weights" in llm.engine.runner.quant_note
        assert type(ours.model.layers[0].mlp.down_proj.weight.data) is not torch.Tensor
        ref = transformers.LlamaForCausalLM(base.config).eval()
        ref.load_state_dict(_hf_state_from_ours(ours, base))
    for ids, out in zip(PROMPTS, outs):
        with torch.no_grad():
            r = ref.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
        want = r.sequences[0, len(ids):].tolist()
        for i, (a, b) in enumerate(zip(out.output_ids, want)):
            if a != b:
                top2 = torch.topk(r.logits[i][0], 2).values
                assert float(top2[0] - top2[1]) < 1e-3, (out.output_ids, want)
                break


def test_int8dq_runs_and_int4wo_needs_cuda(checkpoint):
    from asgl.layers.quantization import QuantizationError

    _, path = checkpoint
    with make_llm(model_path=path, torchao_config="int8dq", skip_tokenizer_init=True,
                  max_total_tokens=1024) as llm:
        out = llm.generate(PROMPTS[0], {"temperature": 0, "max_new_tokens": 4})
    assert len(out.output_ids) == 4
    with pytest.raises(QuantizationError, match="int4wo-128 runs on CUDA only"):
        with make_llm(model_path=path, torchao_config="int4wo-128", skip_tokenizer_init=True,
                      max_total_tokens=1024):
            pass
