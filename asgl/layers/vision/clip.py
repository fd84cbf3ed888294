"""CLIP ViT vision tower (the image encoder of LLaVA 1.5 / NeXT and Yi-VL).

Written from the CLIP paper's encoder (Radford et al. 2021: patch embedding without bias,
a learned class embedding and absolute position embeddings, a LayerNorm before the encoder
("pre_layrnorm" in HF's checkpoints), pre-norm blocks with quick-GELU MLPs, a LayerNorm
after). Parameter names follow HF's `CLIPVisionTransformer`, so a checkpoint's
`vision_tower.*` tensors load by name.

`embed` gives the encoder's input; the caller runs `encoder.layers` as far as it needs
(LLaVA reads the second-to-last layer and never runs the last).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def vision_act(name: str):
    """An HF `hidden_act` of a vision tower as a function."""
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    raise ValueError(f"unsupported vision activation {name!r}")


class VisionAttention(nn.Module):
    """Non-causal multi-head self-attention over one image's patches (batched images)."""

    def __init__(self, hidden: int, heads: int, bias: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden, bias=bias)
        self.k_proj = nn.Linear(hidden, hidden, bias=bias)
        self.v_proj = nn.Linear(hidden, hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                             heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(B, N, -1))


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.act = vision_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = VisionAttention(h, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(h, eps=eps)
        self.mlp = VisionMLP(h, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        h = config.hidden_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(h))
        self.patch_embedding = nn.Conv2d(config.num_channels, h, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, h)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1)
        if x.shape[1] != self.num_positions:
            raise ValueError(f"images of {x.shape[1] - 1} patches; this tower was trained on "
                             f"{self.num_positions - 1}")
        return x + self.position_embedding.weight


class CLIPVisionTower(nn.Module):
    """`embeddings`, `pre_layrnorm`, `encoder.layers`, `post_layernorm`: HF's names."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(config)
                                            for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's input (HF's hidden_states[0]): [B, 1 + patches, hidden]."""
        return self.pre_layrnorm(self.embeddings(pixel_values))
