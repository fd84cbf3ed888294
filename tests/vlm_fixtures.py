"""Tiny random-weight vision-language checkpoints for the CPU tests, saved the way users'
checkpoints are (`save_pretrained` of the model, its tokenizer and its image processor), and
the images they see. Built in a second or two each."""

from __future__ import annotations

import base64
import io
import os
from typing import Any, Optional

import numpy as np

IMAGE_TOKEN = "<image>"
_SPECIALS = ["<s>", "</s>", "<unk>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>",
             "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
             "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<video>"]
_CORPUS = ["the quick brown fox jumps over the lazy dog", "what is in this image?",
           "describe the picture in one word", "user assistant system a cat a dog",
           "USER: ASSISTANT: compare the two images", "hello world 0123456789"] * 20


def tiny_tokenizer(image_token: str = IMAGE_TOKEN) -> Any:
    """A byte-level BPE of a few hundred ids with the special tokens the templates use.
    `image_token` renames the image token (the same id), e.g. for a LLaVA-repo checkpoint,
    whose vocabulary has none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [image_token if t == IMAGE_TOKEN else t for t in _SPECIALS]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>",
                                   additional_special_tokens=specials[3:])


def _perturb_norms(model: Any, seed: int) -> None:
    """LayerNorm / RMSNorm weights and biases random, so a mix-up of them shows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "layrnorm" in name:
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))


# head_dim 128 (GPU attention kernels' sizes) instead of 16: 2 heads of a 256-wide decoder
_GPU_TEXT = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2,
                 num_key_value_heads=1)


def save_tiny_llava(path: str, *, image_size: int = 32, patch: int = 8, seed: int = 0,
                    strategy: str = "default", kind: str = "llava", gpu: bool = False) -> str:
    """A LLaVA 1.5 (kind "llava") or LLaVA-NeXT (kind "next": anyres tiles over a grid of
    pinpoints, image newline) checkpoint of tiny sizes: CLIP ViT + MLP projector + Llama."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessor)

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    sizes = _GPU_TEXT if gpu else dict(hidden_size=64, intermediate_size=128,
                                       num_attention_heads=4, num_key_value_heads=2)
    text = LlamaConfig(vocab_size=len(tok), num_hidden_layers=2, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **sizes)
    crop = {"height": image_size, "width": image_size}
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size],
                 [2 * image_size, 2 * image_size], [3 * image_size, image_size]]
    if kind == "onevision":  # SigLIP tower, Qwen2 decoder, anyres_max with a cap of 2 tiles
        from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                                  LlavaOnevisionImageProcessor, Qwen2Config, SiglipVisionConfig)
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, image_size=image_size,
                                    patch_size=patch, vision_use_head=False)
        qwen = Qwen2Config(**{k: v for k, v in text.to_dict().items()
                              if k in ("vocab_size", "hidden_size", "intermediate_size",
                                       "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "max_position_embeddings",
                                       "bos_token_id", "eos_token_id", "pad_token_id")})
        pinpoints = [[a * image_size, b * image_size] for a in (1, 2, 3) for b in (1, 2, 3)]
        model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
            vision_config=vision, text_config=qwen,
            image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
            video_token_id=tok.convert_tokens_to_ids("<video>"),
            vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints,
            vision_aspect_ratio="anyres_max_2", projector_hidden_act="gelu")).eval()
        processor = LlavaOnevisionImageProcessor(size={"height": image_size, "width": image_size},
                                                 image_grid_pinpoints=pinpoints)
        _perturb_norms(model, seed)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        processor.save_pretrained(path)
        return path
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, image_size=image_size, patch_size=patch,
                              projection_dim=32, hidden_act="quick_gelu")
    common = dict(vision_config=vision, text_config=text,
                  image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                  vision_feature_select_strategy=strategy, vision_feature_layer=-2,
                  projector_hidden_act="gelu")
    if kind == "next":
        model = LlavaNextForConditionalGeneration(
            LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)).eval()
        processor = LlavaNextImageProcessor(size={"shortest_edge": image_size}, crop_size=crop,
                                            image_grid_pinpoints=pinpoints)
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**common)).eval()
        processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
    _perturb_norms(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_qwen2_vl(path: str, *, seed: int = 0, gpu: bool = False) -> str:
    """A Qwen2-VL checkpoint of tiny sizes (ViT with 2-D RoPE and a 2x2 patch merger,
    Qwen2 decoder with M-RoPE sections 2/3/3 of a 16-dim head), patches of 4 pixels."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor)

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    ids = tok.convert_tokens_to_ids
    sizes = _GPU_TEXT if gpu else dict(hidden_size=64, intermediate_size=128,
                                       num_attention_heads=4, num_key_value_heads=2)
    text = dict(vocab_size=len(tok), num_hidden_layers=2, max_position_embeddings=1024,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [16, 24, 24] if gpu else [2, 3, 3]},
                **sizes)
    vision = dict(depth=2, embed_dim=32, hidden_size=sizes["hidden_size"], num_heads=4,
                  mlp_ratio=2, patch_size=4, temporal_patch_size=2, spatial_merge_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision,
                           image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                           vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"))
    model = Qwen2VLForConditionalGeneration(config).eval()
    _perturb_norms(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    Qwen2VLImageProcessor(size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64}, patch_size=4,
                          temporal_patch_size=2, merge_size=2).save_pretrained(path)
    return path


def hf_qwen2_vl_greedy(path: str, prompt: str, images: list[bytes], max_new: int, hf=None
                       ) -> tuple[list[int], list[float], int, int]:
    """transformers' Qwen2-VL greedy tokens on `prompt`, whose image placeholders
    (<|image_pad|> once each) are expanded to grid / merge^2 tokens here; also each step's
    top-2 gap, the first image position and the prompt's length."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    model = hf or Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    proc = AutoImageProcessor.from_pretrained(path, use_fast=False)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    inputs = proc(images=pil, return_tensors="pt")
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    pieces = prompt.split("<|image_pad|>")
    text = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:]))
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    image_id = model.config.image_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         mm_token_type_ids=(ids == image_id).int(),
                         pixel_values=inputs["pixel_values"],
                         image_grid_thw=inputs["image_grid_thw"], max_new_tokens=max_new,
                         do_sample=False, output_scores=True, return_dict_in_generate=True)
    n = ids.shape[1]
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, n:].tolist(), gaps, ids[0].tolist().index(image_id), n


def image_bytes(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG",
                change_pixel: bool = False) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    if change_pixel:
        arr[0, 0, 0] ^= 1
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def hf_pixel_values(path: str, images: list[bytes]) -> Any:
    """The checkpoint's own image processor (transformers) over the images: the reference."""
    from PIL import Image
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(path, use_fast=False)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    return proc(images=pil, return_tensors="pt")["pixel_values"]


TIE_GAP = 1e-3  # top-2 logit gap below which two greedy continuations may differ


def hf_llava(path: str) -> tuple:
    """transformers on the files: (model, processor, tokenizer); LLaVA, LLaVA-NeXT or
    LLaVA-OneVision, as config.json says."""
    import torch
    import transformers as tf

    model_type = tf.AutoConfig.from_pretrained(path).model_type
    model_cls, proc_cls = {
        "llava": (tf.LlavaForConditionalGeneration, tf.LlavaProcessor),
        "llava_next": (tf.LlavaNextForConditionalGeneration, tf.LlavaNextProcessor),
        "llava_onevision": (tf.LlavaOnevisionForConditionalGeneration, None)}[model_type]
    model = model_cls.from_pretrained(path, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    cfg = model.config
    image_proc = tf.AutoImageProcessor.from_pretrained(path, use_fast=False)
    if proc_cls is None:  # OneVision's processor needs a video processor (torchvision)
        proc = _OnevisionProcessor(image_proc, tok, cfg)
    else:
        proc = proc_cls(image_processor=image_proc, tokenizer=tok,
                        patch_size=cfg.vision_config.patch_size,
                        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                        num_additional_image_tokens=1)
    return model, proc, tok


class _OnevisionProcessor:
    """transformers' LlavaOnevisionProcessor prompt expansion, without its video processor
    (which needs torchvision): its own `_get_number_of_features` (single image) and
    base + newline (several images) counts, called unbound on this stand-in."""

    def __init__(self, image_processor, tokenizer, config):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        v = config.vision_config
        self.num_image_tokens = (v.image_size // v.patch_size) ** 2
        self.vision_aspect_ratio = config.vision_aspect_ratio
        self.image_token_id = config.image_token_id

    def __call__(self, text: str, images: list, return_tensors: str = "pt",
                 video: Optional[list] = None) -> dict:
        """`video`: one video's frames for the prompt's `<video>`: each frame the image
        processor's base tile (the whole frame resized to the tower's size), as
        `pixel_values_videos`; expanded by the processor's own `replace_video_token`."""
        import torch
        from transformers import LlavaOnevisionProcessor as P

        result: dict = {}
        if images:
            out = self.image_processor(images=images, return_tensors="pt")
            result.update(pixel_values=out["pixel_values"], image_sizes=out["image_sizes"],
                          batch_num_images=torch.tensor([len(images)]))
        pieces = text.split(IMAGE_TOKEN)
        expanded = pieces[0]
        for k, rest in enumerate(pieces[1:]):
            if len(images) > 1:
                n = self.num_image_tokens + 1
            else:
                h, w = (int(x) for x in out["image_sizes"][k])
                size = out["pixel_values"][0][0].shape[-2:]
                n = P._get_number_of_features(self, h, w, *size)
            expanded += IMAGE_TOKEN * n + rest
        if video:
            frames = self.image_processor(images=video, return_tensors="pt")["pixel_values"][:, 0]
            result["pixel_values_videos"] = frames[None]
            self.video_token = "<video>"
            expanded = expanded.replace("<video>", P.replace_video_token(
                self, {"pixel_values_videos": [frames]}, 0))
        ids = self.tokenizer(expanded, return_tensors="pt")["input_ids"]
        result.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        return result

    def _get_unpadded_features(self, *args):
        from transformers import LlavaOnevisionProcessor as P
        return P._get_unpadded_features(self, *args)


def hf_greedy(hf: tuple, prompt: str, images: list[bytes], max_new: int
              ) -> tuple[list[int], list[float], int, int]:
    """transformers' greedy tokens (its processor expands the prompt's image tokens), each
    step's top-2 gap, the prompt's first image position and its length."""
    from PIL import Image

    model, proc, _ = hf
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    inputs = proc(text=prompt, images=pil, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    n = inputs["input_ids"].shape[1]
    tokens = out.sequences[0, n:].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    first_image = inputs["input_ids"][0].tolist().index(model.config.image_token_id)
    return tokens, gaps, first_image, n


def agree(text: str, ref: list[int], gaps: list[float], tok: Any) -> None:
    """The served text is transformers' decoded tokens, up to the first near-tie."""
    n = next((i for i, g in enumerate(gaps) if g < TIE_GAP), len(ref))
    expected = tok.decode(ref[:n], skip_special_tokens=True)
    assert text.startswith(expected), f"served {text!r}, HF {expected!r} (tokens {ref})"
    if n == len(ref):
        assert text == tok.decode(ref, skip_special_tokens=True), (text, ref)


if __name__ == "__main__":  # build one to look at: python tests/vlm_fixtures.py DIR
    import sys
    print(save_tiny_llava(sys.argv[1] if len(sys.argv) > 1 else os.path.join("/tmp", "llava")))
