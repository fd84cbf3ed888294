"""FP8 layers under tensor parallelism (2 ranks, gloo on the CPU): every scale shards with
its weight (per-channel rows, 128 x 128 blocks) or is replicated (per-tensor pieces), so
TP=2 gives TP=1's greedy tokens for each layout; `--quantization fp8` quantizes each rank's
shard (also of dummy weights)."""

from __future__ import annotations

import pytest

from fp8_checkpoints import (tiny_model, write_fbgemm, write_fp8_per_tensor,
                             write_hf_fp8_block)
from tests.conftest import make_llm

PROMPTS = [[5, 17, 33, 101, 7], [200, 3, 3, 9, 45, 61, 77, 12, 8]]
PARAMS = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def _tokens(tp: int, **options) -> list[list[int]]:
    with make_llm(tp_size=tp, skip_tokenizer_init=True, max_total_tokens=1024,
                  **options) as llm:
        return [o.output_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("layout", ["channel", "tensor-static", "block"])
def test_fp8_checkpoint_tp2_equals_tp1(tmp_path, layout):
    if layout == "block":  # per-rank pieces must be whole 128-blocks: k/v 256, gate/up 512
        path = write_hf_fp8_block(tiny_model(num_key_value_heads=4, intermediate_size=512),
                                  str(tmp_path / layout))
    elif layout == "channel":
        path = write_fbgemm(tiny_model(), str(tmp_path / layout))
    else:
        path = write_fp8_per_tensor(tiny_model(), str(tmp_path / layout), static=True)
    assert _tokens(2, model_path=path) == _tokens(1, model_path=path)


def test_quantize_on_load_tp2_matches_sharded_reference(tmp_path):
    """`--quantization fp8` quantizes each rank's shard: row-parallel layers (o, down) get
    per-channel scales over their half of the columns, so TP=2's weights differ from TP=1's
    by rounding. Its tokens equal a float32 HF model holding exactly those weights (each
    half of o/down quantized per channel on its own)."""
    import torch
    import transformers

    from fp8_checkpoints import is_linear, per_channel

    base = tiny_model()
    path = str(tmp_path / "f32")
    base.save_pretrained(path)
    state = {}
    for name, w in base.state_dict().items():
        if is_linear(name):
            parts = w.chunk(2, dim=1) if name.split(".")[-2] in ("o_proj", "down_proj") else [w]
            w = torch.cat([q.float() * s for q, s in map(per_channel, parts)], dim=1)
        state[name] = w
    ref = transformers.LlamaForCausalLM(base.config).eval()
    ref.load_state_dict(state)
    got = _tokens(2, model_path=path, quantization="fp8")
    for ids, out in zip(PROMPTS, got):
        with torch.no_grad():
            r = ref.generate(torch.tensor([ids]), max_new_tokens=PARAMS["max_new_tokens"],
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
        want = r.sequences[0, len(ids):].tolist()
        for i, (a, b) in enumerate(zip(out, want)):
            if a != b:
                top2 = torch.topk(r.logits[i][0], 2).values
                assert float(top2[0] - top2[1]) < 1e-3, (out, want)
                break


def test_dummy_weights_quantize_under_tp(tmp_path):
    """--load-format dummy --quantization fp8 (the GPU benchmarks' set-up) runs under TP."""
    path = str(tmp_path / "f32")
    tiny_model().save_pretrained(path)
    assert all(len(t) == PARAMS["max_new_tokens"] for t in _tokens(
        2, model_path=path, load_format="dummy", quantization="fp8"))
