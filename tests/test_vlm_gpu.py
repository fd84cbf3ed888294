"""Vision-language models on a GPU (skipped without CUDA): tiny LLaVA-NeXT and Qwen2-VL
with head_dim 128, bf16, served with FlashInfer / Triton attention and CUDA graphs (steps
with image rows run eagerly, decode steps replay graphs with M-RoPE-shifted positions),
against the torch backend without graphs on the same GPU: first tokens equal, and nearly
all continuations (bf16 near-ties may flip a late token)."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")

from conftest import make_llm  # noqa: E402
from vlm_fixtures import image_bytes, save_tiny_llava, save_tiny_qwen2_vl  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("kind", ["next", "qwen2-vl"])
@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_vlm_on_gpu_matches_torch_backend(kind, backend, tmp_path):
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    if kind == "qwen2-vl":
        path = save_tiny_qwen2_vl(str(tmp_path), seed=2, gpu=True)
        ph = "<|vision_start|><|image_pad|><|vision_end|>"
    else:
        path = save_tiny_llava(str(tmp_path), kind="next", seed=2, gpu=True)
        ph = "<image>"
    prompts = [f"<s>USER: {ph}\nwhat is this? ASSISTANT:",
               f"<s>USER: {ph}\n{ph}\ncompare them ASSISTANT:",
               "<s>USER: no image here, just text ASSISTANT:"]
    images = [[image_bytes(1, size=(70, 40))], [image_bytes(2, size=(40, 90)),
                                                 image_bytes(3, size=(64, 64))], None]
    params = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}

    def run(attn: str, graphs: bool):
        llm = make_llm(model_path=path, dtype="bfloat16", device="cuda", attention_backend=attn,
                       chunked_prefill_size=64, max_total_tokens=8192, context_length=1024,
                       disable_cuda_graph=not graphs)
        try:
            assert type(llm.engine.runner.attn_backend).name == attn  # no silent fallback
            one_by_one = [llm.generate(p, params, image_data=imgs)
                          for p, imgs in zip(prompts, images)]

            async def together():  # image prefills next to decodes (mixed steps)
                return await asyncio.gather(*(llm.engine.generate(p, params, image_data=imgs)
                                              for p, imgs in zip(prompts, images)))
            return one_by_one + list(llm._call(together()))
        finally:
            llm.shutdown()

    ref = run("torch", graphs=False)
    got = run(backend, graphs=True)
    assert [o.output_ids[0] for o in got] == [o.output_ids[0] for o in ref]
    same = sum(a.output_ids[:8] == b.output_ids[:8] for a, b in zip(got, ref))
    assert same >= len(got) - 2, ([o.output_ids for o in got], [o.output_ids for o in ref])
