"""Checkpoints in the original LLaVA repository's layout (haotian-liu/LLaVA, LLaVA-VL/
LLaVA-NeXT): `LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM` / `LlavaQwenForCausalLM`,
a decoder config.json with `mm_*` fields (as lmms-lab/llama3-llava-next-8b and
lmms-lab/llava-onevision-qwen2-7b-ov ship). They are read as the HF families they are:

| `image_aspect_ratio` | HF family |
| --- | --- |
| `pad`, `square` (or none) | LLaVA 1.5 (`LlavaForConditionalGeneration`) |
| `anyres` | LLaVA-NeXT (`LlavaNextForConditionalGeneration`) |
| `anyres_max_N` | LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`) |

The vision tower is named by `mm_vision_tower`: a local directory holding its config.json
(and preprocessor_config.json), or one of the hub towers LLaVA checkpoints name, whose
published configs are built in (no hub here). The image processor is the tower's, with the
checkpoint's `image_grid_pinpoints`. Weight names: `model.mm_projector.{0,2}`,
`model.image_newline`, `model.vision_tower.vision_tower.vision_model.*` and the decoder's
`model.*` / `lm_head.*` (`repo_name` maps them). The repo marks images with a sentinel id,
not a vocabulary token: the engine adds `<image>` to the tokenizer as a special token
(its id past the model's vocabulary never reaches the embedding: image rows are replaced).

A SigLIP tower in the repo drops its last layer and reads the output of the rest (the
checkpoint holds the shortened tower), which is feature layer -1 here.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

REPO_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral",
                      "LlavaQwenForCausalLM": "qwen2"}

# Published configs of the towers LLaVA checkpoints name (HF hub ids).
_CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
               num_attention_heads=16, patch_size=14, projection_dim=768,
               hidden_act="quick_gelu", layer_norm_eps=1e-5)
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_TOWERS: dict[str, tuple[str, dict, dict]] = {
    "openai/clip-vit-large-patch14-336": ("clip", dict(_CLIP_L, image_size=336),
                                          dict(image_mean=_CLIP_MEAN, image_std=_CLIP_STD)),
    "openai/clip-vit-large-patch14": ("clip", dict(_CLIP_L, image_size=224),
                                      dict(image_mean=_CLIP_MEAN, image_std=_CLIP_STD)),
    # 27 layers published; the repo's tower drops the last one (see above)
    "google/siglip-so400m-patch14-384": ("siglip", dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
        num_attention_heads=16, image_size=384, patch_size=14,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False),
        dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])),
}
_MM_KEYS = {"mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
            "mm_vision_select_feature", "mm_patch_merge_type", "image_aspect_ratio",
            "image_grid_pinpoints", "mm_use_im_start_end", "mm_use_im_patch_token",
            "architectures", "model_type", "auto_map", "transformers_version"}


def is_repo_layout(raw: dict) -> bool:
    return any(a in REPO_ARCHITECTURES for a in raw.get("architectures") or [])


def _tower(name: str, model_dir: str) -> tuple[Any, dict, Optional[str]]:
    """(vision config, image processor fields, local directory or None) of
    `mm_vision_tower` (a relative path is the model directory's, as Yi-VL ships it)."""
    from transformers import AutoConfig, CLIPVisionConfig, SiglipVisionConfig

    path = os.path.join(model_dir, os.path.expanduser(name))
    if os.path.isfile(os.path.join(path, "config.json")):
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        config = getattr(config, "vision_config", config)  # a whole CLIP / SigLIP model
        proc = {}
        pre = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pre):
            with open(pre, encoding="utf-8") as f:
                proc = {k: v for k, v in json.load(f).items()
                        if k in ("image_mean", "image_std", "resample")}
        return config, proc, path
    if name not in _TOWERS:
        raise ValueError(f"mm_vision_tower {name!r} is neither a local directory with a "
                         f"config.json nor a known tower ({', '.join(_TOWERS)})")
    kind, fields, proc = _TOWERS[name]
    cls = SiglipVisionConfig if kind == "siglip" else CLIPVisionConfig
    return cls(**fields), dict(proc), None


def repo_hf_config(raw: dict, model_dir: str = ".") -> Any:
    """The HF config (LLaVA, LLaVA-NeXT or OneVision) a LLaVA-repo config.json stands for;
    `config.asgl_image_processor` says how to build its image processor."""
    import transformers as tf

    arch = next(a for a in raw["architectures"] if a in REPO_ARCHITECTURES)
    family = REPO_ARCHITECTURES[arch]
    text_cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig,
                "qwen2": tf.Qwen2Config}[family]
    text = text_cls(**{k: v for k, v in raw.items() if k not in _MM_KEYS})
    projector = raw.get("mm_projector_type", "linear")
    if projector not in ("mlp2x_gelu", "mlp2x_gelu_Norm"):
        raise ValueError(f"mm_projector_type {projector!r}: only 'mlp2x_gelu' (LLaVA 1.5 and "
                         "later) and 'mlp2x_gelu_Norm' (Yi-VL) are supported")
    vision, proc, tower_dir = _tower(raw["mm_vision_tower"], model_dir)
    siglip = vision.model_type.startswith("siglip")
    select = "default" if raw.get("mm_vision_select_feature", "patch") == "patch" else "full"
    common = dict(vision_config=vision, text_config=text, projector_hidden_act="gelu",
                  vision_feature_select_strategy="full" if siglip else select,
                  vision_feature_layer=-1 if siglip else raw.get("mm_vision_select_layer", -2),
                  image_token_id=None)
    aspect = str(raw.get("image_aspect_ratio") or "square")
    pinpoints = raw.get("image_grid_pinpoints")
    size = vision.image_size
    crop = {"height": size, "width": size}
    if aspect.startswith("anyres_max"):
        config = tf.LlavaOnevisionConfig(image_grid_pinpoints=pinpoints,
                                         vision_aspect_ratio=aspect, **common)
        processor = ("LlavaOnevisionImageProcessor",
                     dict(proc, size=crop, image_grid_pinpoints=pinpoints))
    elif aspect == "anyres":
        config = tf.LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
        processor = ("LlavaNextImageProcessor",
                     dict(proc, size={"shortest_edge": size}, crop_size=crop,
                          image_grid_pinpoints=pinpoints))
    else:
        config = tf.LlavaConfig(**common)
        processor = ("CLIPImageProcessor",
                     dict(proc, size={"shortest_edge": size}, crop_size=crop))
    config.image_token_id = None  # the engine adds <image> to the tokenizer
    config.video_token_id = None  # (video through the repo layout: not supported)
    config.architectures = [type(config).__name__.replace("Config", "ForConditionalGeneration")]
    config.asgl_image_processor = processor
    config.asgl_layout = arch
    yi = projector.endswith("_Norm")  # Yi-VL: LayerNorms in the projector, its own token
    config.asgl_projector_norm = yi
    config.asgl_placeholder = "<image_placeholder>" if yi else "<image>"
    config.asgl_pad_square = aspect == "pad"  # the repo pads to a square of the mean colour
    config.asgl_tower_dir = tower_dir  # its weights, when the checkpoint lacks them
    return config


def tower_weights(tower_dir: str):
    """A local tower's own weights (`vision_model.*`), named as the repo's checkpoint names
    them; Yi-VL keeps its fine-tuned ViT there."""
    import glob

    import torch

    files = sorted(glob.glob(os.path.join(tower_dir, "*.safetensors")))
    if files:
        from safetensors.torch import load_file
        states = (load_file(f) for f in files)
    else:  # weights_only: a .bin is a pickle, and unpickling arbitrary objects runs code
        states = (torch.load(f, map_location="cpu", weights_only=True)
                  for f in sorted(glob.glob(os.path.join(tower_dir, "*.bin"))))
    for state in states:
        for name, tensor in state.items():
            if name.startswith("vision_model."):
                yield "model.vision_tower.vision_tower." + name, tensor


def build_image_processor(spec: Optional[tuple[str, dict]]) -> Any:
    """The image processor `repo_hf_config` described, PIL backend."""
    import transformers as tf

    name, kwargs = spec
    cls = getattr(tf, name.replace("ImageProcessor", "ImageProcessorPil"), None) \
        or getattr(tf, name)
    return cls(**kwargs)


def repo_name(name: str) -> Optional[str]:
    """A LLaVA-repo weight name in the HF LLaVA layout (None: not a repo name)."""
    for old, new in (("model.mm_projector.0.", "multi_modal_projector.linear_1."),
                     ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
                     # Yi-VL: Linear, LayerNorm, GELU, Linear, LayerNorm
                     ("model.mm_projector.1.", "multi_modal_projector.ln_1."),
                     ("model.mm_projector.3.", "multi_modal_projector.linear_2."),
                     ("model.mm_projector.4.", "multi_modal_projector.ln_2."),
                     ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
                     ("model.image_newline", "image_newline")):
        if name.startswith(old):
            return new + name[len(old):]
    return None
