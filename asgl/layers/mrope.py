"""Multimodal rotary position embedding (M-RoPE, Qwen2-VL).

Written from the Qwen2-VL paper (Wang et al. 2024, "Qwen2-VL: Enhancing Vision-Language
Model's Perception of the World at Any Resolution", section 2.1): the rotary frequencies
are cut into three sections (`mrope_section`, e.g. 16 / 24 / 24 of the 64 frequencies of a
128-dim head); each section rotates by one component of a 3-D position (temporal, height,
width). Text tokens have three equal components, which is plain 1-D RoPE: so `positions`
may be [T] (text-only steps, decode, CUDA graphs) or [3, T] (steps with image rows).
"""

from __future__ import annotations

import torch

from asgl.layers.rotary import RotaryEmbedding


class MRotaryEmbedding(RotaryEmbedding):
    def __init__(self, head_dim: int, max_position: int, base: float,
                 sections: list[int]):
        super().__init__(head_dim, head_dim, max_position, base, is_neox_style=True)
        if sum(sections) != head_dim // 2:
            raise ValueError(f"mrope_section {sections} must add up to head_dim / 2 = "
                             f"{head_dim // 2}")
        self.sections = list(sections)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # [3, T, head_dim / 2]

        def pick(t: torch.Tensor) -> torch.Tensor:  # section i rotates by component i
            return torch.cat([part[i] for i, part in enumerate(t.split(self.sections, -1))],
                             dim=-1)

        cos, sin = pick(cos), pick(sin)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
