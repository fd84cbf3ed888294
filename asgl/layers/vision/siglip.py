"""SigLIP ViT vision tower (LLaVA-OneVision's image encoder).

Written from the SigLIP paper (Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training"; the tower is a plain ViT: patch embedding with bias, learned position
embeddings, no class token and no norm before the encoder, pre-norm blocks with
tanh-approximated GELU, a LayerNorm after). Parameter names follow HF's
`SiglipVisionTransformer`; the attention-pooling head is not used by LLaVA and not built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from asgl.layers.vision.clip import CLIPEncoderLayer


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=config.patch_size, stride=config.patch_size)
        self.num_positions = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        if x.shape[1] != self.num_positions:
            raise ValueError(f"images of {x.shape[1]} patches; this tower was trained on "
                             f"{self.num_positions}")
        return x + self.position_embedding.weight


class SiglipVisionTower(nn.Module):
    """`embeddings`, `encoder.layers`, `post_layernorm`: HF's names. The blocks are CLIP's
    (same layout and names; the activation comes from the config)."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(config)
                                            for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's input (HF's hidden_states[0])."""
        return self.embeddings(pixel_values)
