"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): Qwen2-VL's ViT (layers/vision/qwen2_vit.py)
and a Qwen2 decoder with multimodal RoPE (layers/mrope.py).

Written from the Qwen2-VL paper (Wang et al. 2024, section 2.1) and HF's config fields
(`vision_config.{patch_size, temporal_patch_size, spatial_merge_size}`,
`text_config.rope_parameters.mrope_section`, `image_token_id`). An image of h x w patches
fills h * w / merge^2 positions, laid out row by row over the merged grid; their 3-D rotary
positions are (t, row, column) from the image's first position, and the text after the
image resumes at that position + max(rows, columns) (contracts/multimodal.py).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from asgl.engine.contracts.forward_batch import ForwardBatch
from asgl.engine.contracts.multimodal import MMItem
from asgl.layers.mrope import MRotaryEmbedding
from asgl.layers.quant import QuantizationConfig
from asgl.layers.rotary import rope_parameters
from asgl.layers.vision.qwen2_vit import Qwen2VisionTower
from asgl.models.llama import Qwen2ForCausalLM
from asgl.models.weights import assign_weights


class Qwen2VLForConditionalGeneration(nn.Module):
    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None):
        super().__init__()
        self.config = config
        text = config.text_config
        self.language_model = Qwen2ForCausalLM(text, quant_config)
        params = rope_parameters(text)
        sections = params.get("mrope_section") or [16, 24, 24]
        lm = self.language_model
        rope = MRotaryEmbedding(lm.head_dim, text.max_position_embeddings,
                                params["rope_theta"], sections)
        for layer in lm.model.layers:  # every layer rotates by the 3-D positions
            layer.self_attn.rotary_emb = rope
        self.visual = Qwen2VisionTower(config.vision_config)
        # what the runner sizes the KV pool by: the language model's
        self.num_layers, self.num_kv_heads = lm.num_layers, lm.num_kv_heads
        self.head_dim = lm.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        chunks = batch.extra.get("mm") if batch is not None else None
        if chunks:  # image rows: their 3-D positions; text rows keep (t, t, t)
            pos3 = positions.unsqueeze(0).repeat(3, 1)
            for c in chunks:
                rel = c.item.mrope[:, c.start:c.end].to(positions.device)
                pos3[:, c.dest:c.dest + c.end - c.start] = c.rope_start + rel
            positions = pos3
        return self.language_model(input_ids, positions, batch, input_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def embed_input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def encode_images(self, items: list[MMItem], device: torch.device) -> list[torch.Tensor]:
        patches = torch.cat([it.data["pixel_values"] for it in items]).to(device)
        grids = [tuple(int(x) for x in it.data["grid_thw"]) for it in items]
        feats = self.visual(patches, grids)
        return list(feats.split([it.length for it in items]))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        assign_weights(self, self._map_weights(weights))

    def _map_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        lm = self.language_model
        for name, tensor in weights:
            mapped = hf_qwen2_vl_name(name)
            if mapped.startswith("language_model."):
                for _, inner, t, shard in lm._map_weights([(mapped[15:], tensor)]):
                    yield name, "language_model." + inner, t, shard
            else:
                yield name, mapped, tensor, None


def hf_qwen2_vl_name(name: str) -> str:
    """Qwen's hub layout (`visual.*`, `model.*`, `lm_head.*`) and transformers 5's
    (`model.visual.*`, `model.language_model.*`) in ours."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("visual."):
        return name
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name.startswith("model."):
        return "language_model." + name
    if name.startswith("lm_head."):
        return "language_model." + name
    return name


class Qwen2VLImageInputs:
    """Host side: the checkpoint's Qwen2-VL image processor (resize to multiples of
    patch x merge within its pixel bounds; patches flattened block by block)."""

    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"

    def __init__(self, config: Any, image_processor: Any):
        self.config = config
        self.processor = image_processor
        self.image_token_id = int(config.image_token_id)
        self.merge = config.vision_config.spatial_merge_size

    def process(self, image: Any) -> tuple[dict[str, Any], int]:
        out = self.processor(images=[image], return_tensors="pt")
        t, h, w = (int(x) for x in out["image_grid_thw"][0])
        m = self.merge
        rows, cols = h // m, w // m
        # (t, row, column) of each merged token, row-major (the merger's output order)
        tt = torch.arange(t).repeat_interleave(rows * cols)
        rr = torch.arange(rows).repeat_interleave(cols).repeat(t)
        cc = torch.arange(cols).repeat(rows * t)
        data = {"pixel_values": out["pixel_values"], "grid_thw": (t, h, w)}
        return data, t * rows * cols, torch.stack([tt, rr, cc]), max(rows, cols)


Qwen2VLForConditionalGeneration.image_inputs = Qwen2VLImageInputs
