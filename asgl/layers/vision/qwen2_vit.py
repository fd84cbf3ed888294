"""Qwen2-VL's vision transformer: native-resolution patches, 2-D rotary attention, and a
patch merger that folds each 2x2 block of patches into one language-model token.

Written from the Qwen2-VL paper (Wang et al. 2024, section 2.1: "Naive Dynamic Resolution",
2D-RoPE in the ViT, an MLP compressing adjacent 2x2 tokens) and HF's checkpoint names
(`patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
`merger.{ln_q,mlp.0,mlp.2}`). The image processor hands over patches already flattened
(channels x temporal patch x patch x patch each) and ordered block by block (the 2x2
blocks the merger folds are consecutive); `grid_thw` gives each image's patch grid.
Attention stays within one image (one frame).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asgl.layers.vision.clip import VisionMLP


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Qwen2VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.attn.proj = nn.Linear(dim, dim, bias=True)
        self.mlp = VisionMLP(dim, mlp_dim, act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                lengths: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.attn.qkv(self.norm1(x)).view(N, 3, self.heads, -1).unbind(1)
        # rotary in float32, as the reference rotates
        c, s = cos[:, None], sin[:, None]
        q = (q.float() * c + _rotate_half(q.float()) * s).to(v.dtype)
        k = (k.float() * c + _rotate_half(k.float()) * s).to(v.dtype)
        outs = []
        for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            o = F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1),
                                               vi.transpose(0, 1))
            outs.append(o.transpose(0, 1).reshape(qi.shape[0], -1))
        x = x + self.attn.proj(torch.cat(outs))
        return x + self.mlp(self.norm2(x))


class Qwen2VisionTower(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        dim, heads = config.embed_dim, config.num_heads
        self.merge = config.spatial_merge_size
        self.patch_embed = nn.Module()
        p, t = config.patch_size, config.temporal_patch_size
        self.patch_embed.proj = nn.Conv3d(config.in_channels, dim, kernel_size=(t, p, p),
                                          stride=(t, p, p), bias=False)
        self.blocks = nn.ModuleList(
            Qwen2VisionBlock(dim, heads, int(dim * config.mlp_ratio), config.hidden_act)
            for _ in range(config.depth))
        self.merger = nn.Module()
        merged = dim * self.merge ** 2
        self.merger.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.merger.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(),
                                        nn.Linear(merged, config.hidden_size))
        params = getattr(config, "rope_parameters", None) or {}
        self.theta = float(params.get("rope_theta", 10000.0))
        self.rot_dim = (dim // heads) // 2  # each of h and w rotates half the head

    def _rotary(self, grid_thw: list[tuple[int, int, int]], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.merge
        rows, cols = [], []
        for t, h, w in grid_thw:  # the processor's order: merge blocks, then within a block
            r = torch.arange(h, device=device)[:, None].expand(h, w)
            c = torch.arange(w, device=device)[None, :].expand(h, w)
            for a, out in ((r, rows), (c, cols)):
                out.append(a.reshape(h // m, m, w // m, m).transpose(1, 2).flatten().repeat(t))
        inv = 1.0 / (self.theta ** (torch.arange(0, self.rot_dim, 2, device=device,
                                                 dtype=torch.float32) / self.rot_dim))
        angles = torch.cat([torch.cat(rows)[:, None] * inv, torch.cat(cols)[:, None] * inv], -1)
        angles = torch.cat([angles, angles], dim=-1)  # [N, head_dim]
        return angles.cos(), angles.sin()

    def forward(self, patches: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """[sum t*h*w, C*t*p*p] flattened patches -> [sum t*h*w / merge^2, hidden]."""
        w = self.patch_embed.proj.weight
        x = F.linear(patches.to(w.dtype), w.reshape(w.shape[0], -1))  # the conv, per patch
        cos, sin = self._rotary(grid_thw, x.device)
        lengths = [h * w_ for t, h, w_ in grid_thw for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        merged = self.merger.ln_q(x).reshape(-1, x.shape[-1] * self.merge ** 2)
        return self.merger.mlp(merged)
