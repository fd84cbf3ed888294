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
        # the image token has no logit row: what would index logits by it is refused
        from asgl.engine.contracts.errors import InvalidRequest
        with pytest.raises(InvalidRequest, match="outside the vocabulary"):
            await engine.generate(prompt, {"repetition_penalty": 1.1}, image_data=images)
        with pytest.raises(InvalidRequest, match="outside the vocabulary"):
            await engine.generate(prompt, {}, image_data=images, return_logprob=True,
                                  logprob_start_len=0)
    finally:
        await engine.shutdown()


# --------------------------------------------------------------------------- Yi-VL
def _expand2square(image, mean):
    """LLaVA's "pad" preprocessing, transcribed from haotian-liu/LLaVA llava/mm_utils.py
    (expand2square, rev 9a26bd1): the image pasted centred on a square of the mean colour."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), tuple(int(x * 255) for x in mean))
    out.paste(image, ((side - w) // 2, 0) if h > w else (0, (side - h) // 2))
    return out


class _YiProjector(torch.nn.Module):
    """Yi-VL's "mlp2x_gelu_Norm" projector, transcribed from 01-ai/Yi
    VL/llava/model/multimodal_projector/builder.py (rev 42dd1d3): Linear, LayerNorm, GELU,
    Linear, LayerNorm."""

    def __init__(self, vision: int, text: int):
        super().__init__()
        self.seq = torch.nn.Sequential(torch.nn.Linear(vision, text), torch.nn.LayerNorm(text),
                                       torch.nn.GELU(), torch.nn.Linear(text, text),
                                       torch.nn.LayerNorm(text))

    def forward(self, x):
        return self.seq(x)


def to_yi_layout(hf_dir: str, out: str, seed: int = 0) -> tuple[str, dict]:
    """The tiny LLaVA 1.5 as Yi-VL ships: projector with LayerNorms, the fine-tuned ViT in
    ./vit/<tower>/ (its own checkpoint, none in the main one), "pad" images,
    `<image_placeholder>`. Returns the directory and the projector's weights."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    os.makedirs(out, exist_ok=True)
    tower = os.path.join(out, "vit", "clip-vit-tiny-yi-vl")
    config.vision_config.save_pretrained(tower)
    with open(os.path.join(hf_dir, "preprocessor_config.json")) as f:
        pre = json.load(f)
    with open(os.path.join(tower, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f)
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    save_file({"vision_model." + k[len("vision_tower."):]: t.contiguous()
               for k, t in weights.items() if k.startswith("vision_tower.")},
              os.path.join(tower, "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    text = config.text_config.hidden_size
    proj = {"0.weight": weights["multi_modal_projector.linear_1.weight"],
            "0.bias": weights["multi_modal_projector.linear_1.bias"],
            "1.weight": 1 + 0.3 * torch.randn(text, generator=g),
            "1.bias": 0.3 * torch.randn(text, generator=g),
            "3.weight": weights["multi_modal_projector.linear_2.weight"],
            "3.bias": weights["multi_modal_projector.linear_2.bias"],
            "4.weight": 1 + 0.3 * torch.randn(text, generator=g),
            "4.bias": 0.3 * torch.randn(text, generator=g)}
    main = {("model." + k[len("language_model.model."):]) if k.startswith("language_model.model.")
            else "lm_head.weight": t.contiguous()
            for k, t in weights.items() if k.startswith("language_model.")}
    main.update({f"model.mm_projector.{k}": v.contiguous() for k, v in proj.items()})
    save_file(main, os.path.join(out, "model.safetensors"))
    raw = config.text_config.to_dict()
    raw.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava",
               mm_vision_tower="./vit/clip-vit-tiny-yi-vl", mm_projector_type="mlp2x_gelu_Norm",
               mm_hidden_size=config.vision_config.hidden_size, mm_vision_select_layer=-2,
               mm_vision_select_feature="patch", image_aspect_ratio="pad")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw, f)
    tiny_tokenizer(image_token="<reserved_0>").save_pretrained(out)
    return out, proj


async def test_yi_vl_layout_matches_a_transcription(tmp_path_factory):
    """Yi-VL-style: transformers' LLaVA with its projector swapped for the Yi transcription
    and the images padded to squares as the LLaVA repo pads them is the reference."""
    from PIL import Image
    import io

    hf_dir = save_tiny_llava(str(tmp_path_factory.mktemp("yi_hf")), seed=6)
    yi_dir, proj = to_yi_layout(hf_dir, str(tmp_path_factory.mktemp("yi")))
    model, proc, tok = hf_llava(hf_dir)
    yi = _YiProjector(model.config.vision_config.hidden_size, model.config.text_config.hidden_size)
    yi.seq.load_state_dict(proj)
    model.model.multi_modal_projector = yi.eval()
    mean = proc.image_processor.image_mean
    engine = await Engine(model_path=yi_dir, dtype="float32", device="cpu",
                          chunked_prefill_size=16, max_total_tokens=4096).start()
    try:
        for sizes in ([(50, 20)], [(20, 45), (33, 33)]):
            images = [image_bytes(70 + k, size=s) for k, s in enumerate(sizes)]
            padded = [_expand2square(Image.open(io.BytesIO(b)).convert("RGB"), mean)
                      for b in images]
            content = "\n".join(["{img}"] * len(images) + ["what is in this image?"])
            prompt = f"<s>{SYSTEM} USER: {content} ASSISTANT:"
            inputs = proc(text=prompt.format(img="<image>"), images=padded, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
            n = inputs["input_ids"].shape[1]
            ref = out.sequences[0, n:].tolist()
            gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
            got = await engine.generate(prompt.format(img="<image_placeholder>"),
                                        {"temperature": 0, "max_new_tokens": MAX_NEW},
                                        image_data=images)
            agree(got.text, ref, gaps, tok)
            assert got.prompt_tokens == n
    finally:
        await engine.shutdown()
