"""LLaVA 1.5 (`LlavaForConditionalGeneration`): a CLIP ViT tower, a two-layer MLP projector
and a decoder LM (Llama / Mistral / Qwen2) from this package.

Written from the LLaVA 1.5 paper (Liu et al. 2023, "Improved Baselines with Visual
Instruction Tuning": the tower's second-to-last layer, patch tokens only, through
Linear-GELU-Linear into the LM's embedding space) and HF's config fields
(`vision_feature_layer`, `vision_feature_select_strategy`, `image_token_id`).

Images reach the model as host tensors prepared off the event loop by `LlavaImageInputs`
(the checkpoint's own image processor); the worker's `MultimodalEncoder` calls
`encode_images` once per image and scatters the features into the input embeddings.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterable, Optional

import torch
from torch import nn

from asgl.engine.contracts.forward_batch import ForwardBatch
from asgl.engine.contracts.multimodal import MMItem
from asgl.layers.quant import QuantizationConfig
from asgl.layers.vision.clip import CLIPVisionTower, vision_act
from asgl.models.weights import assign_weights

_TEXT_MODELS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen2_vl_text": "Qwen2ForCausalLM"}


def text_model_class(text_config: Any) -> type:
    from asgl.models.registry import get_model_class

    archs = list(getattr(text_config, "architectures", None) or [])
    name = _TEXT_MODELS.get(getattr(text_config, "model_type", ""), None)
    if name is not None:
        archs.append(name)
    return get_model_class(archs or ["LlamaForCausalLM"])


def vision_tower(config: Any) -> nn.Module:
    """The tower a vision config describes: CLIP (LLaVA 1.5 / NeXT) or SigLIP (OneVision)."""
    if getattr(config, "model_type", "") in ("siglip_vision_model", "siglip"):
        from asgl.layers.vision.siglip import SiglipVisionTower
        return SiglipVisionTower(config)
    return CLIPVisionTower(config)


def feature_layers(config: Any) -> list[int]:
    """The tower layers whose outputs are used, as counts of layers run (HF's
    hidden_states index: 0 is the embeddings, -1 the last layer)."""
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    total = config.vision_config.num_hidden_layers
    return [k if k >= 0 else total + 1 + k for k in layers]


class LlavaProjector(nn.Module):
    """Linear-GELU-Linear; with `norm` (Yi-VL's "mlp2x_gelu_Norm"), a LayerNorm after each
    Linear."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool = True,
                 norm: bool = False):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)
        self.act = vision_act(act)
        self.norm = norm
        if norm:
            self.ln_1 = nn.LayerNorm(text_hidden)
            self.ln_2 = nn.LayerNorm(text_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm:
            return self.ln_2(self.linear_2(self.act(self.ln_1(self.linear_1(x)))))
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(nn.Module):
    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None):
        super().__init__()
        self.config = config
        text = config.text_config
        self.language_model = text_model_class(text)(text, quant_config)
        self.vision_tower = vision_tower(config.vision_config)
        self.layers = feature_layers(config)
        self.select = config.vision_feature_select_strategy
        self.multi_modal_projector = LlavaProjector(
            config.vision_config.hidden_size * len(self.layers), text.hidden_size,
            config.projector_hidden_act, getattr(config, "multimodal_projector_bias", True),
            norm=getattr(config, "asgl_projector_norm", False))
        lm = self.language_model
        # what the runner sizes the KV pool by: the language model's
        self.num_layers, self.num_kv_heads = lm.num_layers, lm.num_kv_heads
        self.head_dim = lm.head_dim

    # ------------------------------------------------------------------ text
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.language_model(input_ids, positions, batch, input_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def embed_input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    # ------------------------------------------------------------------ images
    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, patches (+1 with strategy "full"), vision hidden * layers] of B images."""
        x = self.vision_tower.embed(pixel_values)
        outs = [x] if 0 in self.layers else []
        for k, layer in enumerate(self.vision_tower.encoder.layers[:max(self.layers)], 1):
            x = layer(x)
            if k in self.layers:
                outs.append(x)
        order = sorted(self.layers)
        x = torch.cat([outs[order.index(k)] for k in self.layers], dim=-1)
        return x[:, 1:] if self.select == "default" else x

    def encode_images(self, items: list[MMItem], device: torch.device) -> list[torch.Tensor]:
        """Features ([positions, text hidden]) of each image, the tower run batched."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        pixels = torch.cat([it.data["pixel_values"] for it in items]).to(device, dtype)
        feats = self.multi_modal_projector(self.tower_features(pixels))
        return list(feats.unbind(0))

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tower_dir = getattr(self.config, "asgl_tower_dir", None)  # (LLaVA-repo layout)
        if tower_dir is not None and _has_weights(tower_dir):
            from asgl.models.llava_repo import tower_weights
            weights = itertools.chain(tower_weights(tower_dir), weights)  # checkpoint wins
        assign_weights(self, self._map_weights(weights))

    def _map_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        lm = self.language_model
        for name, tensor in weights:
            mapped = hf_llava_name(name)
            if mapped.startswith("language_model."):  # the LM's own renames (fused q/k/v)
                for _, inner, t, shard in lm._map_weights([(mapped[15:], tensor)]):
                    yield name, "language_model." + inner, t, shard
            elif mapped.endswith(".position_ids") or mapped.startswith("vision_tower.head."):
                continue  # a buffer some checkpoints carry; SigLIP's pooling head (unused)
            else:
                yield name, mapped, tensor, None


def _has_weights(path: str) -> bool:
    return any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))


def hf_llava_name(name: str) -> str:
    """A checkpoint name of any LLaVA layout HF wrote (llava-hf on the hub:
    `language_model.model.*`, `vision_tower.vision_model.*`; transformers 5 in memory:
    `model.language_model.*`, `model.vision_tower.*`, `lm_head.*`; the LLaVA repo's:
    `model.mm_projector.*`, models/llava_repo.py) in ours."""
    from asgl.models.llava_repo import repo_name

    repo = repo_name(name)
    if repo is not None:
        return repo
    if name.startswith("model.language_model."):
        name = "language_model.model." + name[len("model.language_model."):]
    elif name.startswith("lm_head."):
        name = "language_model." + name
    elif name.startswith("language_model.lm_head."):
        pass
    elif name.startswith(("model.vision_tower.", "model.multi_modal_projector.",
                          "model.image_newline")):
        name = name[len("model."):]
    elif name.startswith("model."):  # the LLaVA repo's decoder
        name = "language_model." + name
    if name.startswith("vision_tower.vision_model."):
        name = "vision_tower." + name[len("vision_tower.vision_model."):]
    return name


class LlavaImageInputs:
    """Host side (the engine's image pool, off the event loop): an image to pixel tensors
    with the checkpoint's own image processor, and how many prompt positions it fills."""

    placeholder = "<image>"

    def __init__(self, config: Any, image_processor: Any):
        self.config = config
        self.processor = image_processor
        self.placeholder = getattr(config, "asgl_placeholder", None) or self.placeholder
        self.pad_square = getattr(config, "asgl_pad_square", False)
        token = getattr(config, "image_token_id", None)
        if token is None and getattr(config, "asgl_layout", None) is None:
            token = config.image_token_index
        # None (LLaVA-repo layout): the engine adds the placeholder to the tokenizer
        self.image_token_id = int(token) if token is not None else None
        v = config.vision_config
        patches = (v.image_size // v.patch_size) ** 2
        self.positions = patches + (1 if config.vision_feature_select_strategy == "full" else 0)

    def process(self, image: Any) -> tuple[dict[str, torch.Tensor], int]:
        """(host tensors for `encode_images`, positions) of one RGB PIL image."""
        if self.pad_square:
            image = pad_to_square(image, self.processor.image_mean)
        out = self.processor(images=[image], return_tensors="pt")
        return {"pixel_values": out["pixel_values"]}, self.positions


LlavaForConditionalGeneration.image_inputs = LlavaImageInputs


def pad_to_square(image: Any, mean: Any) -> Any:
    """The LLaVA repository's "pad" aspect ratio: the image centred on a square of the
    processor's mean colour (its longer side), before the processor resizes it."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), tuple(int(x * 255) for x in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas
