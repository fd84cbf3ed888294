"""LLaVA-NeXT and LLaVA-OneVision checkpoints in the original LLaVA repository's layout
(`LlavaLlamaForCausalLM` / `LlavaQwenForCausalLM`, `mm_*` config fields, `model.mm_projector.*`
and `model.vision_tower.vision_tower.vision_model.*` weights, a tokenizer without an image
token, the tower named by `mm_vision_tower`): the tiny HF checkpoints of
tests/vlm_fixtures.py rewritten that way load and give transformers' tokens on the HF
originals (one and two images)."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")

from asgl.engine.loop.engine import Engine  # noqa: E402
from vlm_fixtures import (agree, hf_greedy, hf_llava, image_bytes, save_tiny_llava,  # noqa: E402
                          tiny_tokenizer)

pytestmark = pytest.mark.asyncio(loop_scope="module")
MAX_NEW = 8
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the user's questions.")

_RENAMES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
            ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
            ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
            ("image_newline", "model.image_newline"))


def to_repo_layout(hf_dir: str, out: str) -> str:
    """Rewrite an HF LLaVA-NeXT / OneVision directory as the LLaVA repo saves it."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    os.makedirs(out, exist_ok=True)
    tower = os.path.join(out, "tower")  # mm_vision_tower: a local tower directory
    config.vision_config.save_pretrained(tower)
    with open(os.path.join(hf_dir, "preprocessor_config.json")) as f:
        pre = json.load(f)
    with open(os.path.join(tower, "preprocessor_config.json"), "w") as f:
        json.dump({k: pre[k] for k in ("image_mean", "image_std", "resample")}, f)
    onevision = config.model_type == "llava_onevision"
    raw = config.text_config.to_dict()
    raw.update(architectures=["LlavaQwenForCausalLM" if onevision else "LlavaLlamaForCausalLM"],
               model_type="llava", mm_vision_tower=tower, mm_projector_type="mlp2x_gelu",
               mm_hidden_size=config.vision_config.hidden_size,
               mm_vision_select_layer=config.vision_feature_layer,
               mm_vision_select_feature="patch" if not onevision else "full",
               mm_patch_merge_type="spatial_unpad",
               image_aspect_ratio=config.vision_aspect_ratio if onevision else "anyres",
               image_grid_pinpoints=config.image_grid_pinpoints)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw, f)
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    renamed = {}
    for name, t in weights.items():
        for old, new in _RENAMES:
            if name.startswith(old):
                renamed[new + name[len(old):]] = t.contiguous()
                break
        else:
            raise AssertionError(f"unexpected HF name {name}")
    save_file(renamed, os.path.join(out, "model.safetensors"))
    tiny_tokenizer(image_token="<reserved_0>").save_pretrained(out)  # no <image> token
    return out


@pytest.fixture(scope="module", params=["next", "onevision"])
def dirs(request, tmp_path_factory):
    hf_dir = save_tiny_llava(str(tmp_path_factory.mktemp(request.param)), kind=request.param,
                             seed=5)
    return hf_dir, to_repo_layout(hf_dir, str(tmp_path_factory.mktemp("repo")))


async def test_repo_layout_loads_and_matches_hf(dirs):
    hf_dir, repo_dir = dirs
    hf = hf_llava(hf_dir)
    engine = await Engine(model_path=repo_dir, dtype="float32", device="cpu",
                          chunked_prefill_size=16, max_total_tokens=4096).start()
    try:
        assert engine.images.image_token_id >= engine.vocab_size  # added to the tokenizer
        for sizes in ([(100, 90)], [(40, 30), (81, 30)]):
            images = [image_bytes(60 + k, size=s) for k, s in enumerate(sizes)]
            content = "\n".join(["<image>"] * len(images) + ["what is in this image?"])
            prompt = f"<s>{SYSTEM} USER: {content} ASSISTANT:"
            ref, gaps, _, n_prompt = hf_greedy(hf, prompt, images, MAX_NEW)
            ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
            out = await engine.generate(prompt, {"temperature": 0, "max_new_tokens": MAX_NEW},
                                        image_data=images)
            agree(out.text, ref, gaps, hf[2])
            assert out.prompt_tokens == n_prompt
            assert ids.count(engine.images.image_token_id) == len(images)
    finally:
        await engine.shutdown()
