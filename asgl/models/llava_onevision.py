"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's anyres with a
SigLIP tower (no class token: strategy "full"), a Qwen2 decoder, and two rules of its own.

Written from the LLaVA-OneVision paper (Li et al. 2024, "LLaVA-OneVision: Easy Visual Task
Transfer", section 3: "Higher AnyRes" with a cap on the visual tokens, and the single-image
/ multi-image / video representations) and HF's config (`vision_aspect_ratio`
"anyres_max_N"):

- one image in a request: anyres, but when the unpadded map holds more than ~N tiles'
  worth of patches (ratio sqrt(rows * cols / (N * side^2)) > 1.1) it is shrunk by that ratio
  with bilinear interpolation before the newlines are added;
- several images in a request: each is only its base tile (side^2 features) + one newline;
- a video (a list of frames): each frame's base tile, its feature map pooled 2x2 by bilinear
  interpolation (ceil(side / 2)^2 features), the frames in order, then one newline.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from asgl.engine.contracts.multimodal import MMItem
from asgl.models.llava_next import (LlavaNextForConditionalGeneration, LlavaNextImageInputs,
                                    best_grid, unpadded_map)


def _max_tiles(config: Any) -> int:
    return int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).rsplit("_", 1)[-1])


def _shrunk(rows: int, cols: int, side: int, max_tiles: int) -> tuple[int, int]:
    """The map's size after OneVision's cap on its tokens."""
    ratio = math.sqrt(rows * cols / (max_tiles * side ** 2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


class LlavaOnevisionForConditionalGeneration(LlavaNextForConditionalGeneration):
    select_strategy = "full"

    def encode_images(self, items: list[MMItem], device: torch.device) -> list[torch.Tensor]:
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        pixels = torch.cat([it.data["pixel_values"] for it in items]).to(device, dtype)
        feats = self.multi_modal_projector(self.tower_features(pixels))
        out, start = [], 0
        newline = self.image_newline[None]
        for it in items:
            n = it.data["pixel_values"].shape[0]
            f = feats[start:start + n]
            if it.data.get("video"):  # frames pooled 2x2, then one newline
                out.append(torch.cat([self._pool_frames(f), newline.to(f.dtype)]))
            elif it.data.get("multi"):  # one of several images: base tile + a newline
                out.append(torch.cat([f[0], newline.to(f.dtype)]))
            else:
                out.append(self.pack(f, *it.data["image_size"]))
            start += n
        return out

    def _pool_frames(self, feats: torch.Tensor) -> torch.Tensor:
        """[frames, side^2, D] -> [frames * ceil(side / 2)^2, D], bilinear."""
        F_, s, D = feats.shape[0], self.side, feats.shape[-1]
        half = math.ceil(s / 2)
        grid = feats.view(F_, s, s, D).permute(0, 3, 1, 2)
        pooled = F.interpolate(grid, [half, half], mode="bilinear")
        return pooled.permute(0, 2, 3, 1).reshape(-1, D)

    def pack(self, feats: torch.Tensor, height: int, width: int) -> torch.Tensor:
        base, tiles = feats[0], feats[1:]
        if tiles.shape[0] == 0:
            return torch.cat([base, self.image_newline[None].to(base.dtype)])
        grid = self._grid_map(tiles, height, width)
        rows, cols = _shrunk(grid.shape[0], grid.shape[1], self.side, _max_tiles(self.config))
        if (rows, cols) != tuple(grid.shape[:2]):
            grid = F.interpolate(grid.permute(2, 0, 1)[None], [rows, cols],
                                 mode="bilinear")[0].permute(1, 2, 0)
        return torch.cat([base, self._with_newlines(grid)])


class LlavaOnevisionImageInputs(LlavaNextImageInputs):
    video_placeholder = "<video>"

    def __init__(self, config: Any, image_processor: Any):
        super().__init__(config, image_processor)
        video = getattr(config, "video_token_id", None)
        self.video_token_id = int(video) if video is not None else None

    def process_video(self, frames: list) -> tuple[dict[str, Any], int]:
        """Each frame resized to the tower's size (the base tile of the image processor);
        positions: ceil(side / 2)^2 per frame after pooling, and one newline."""
        out = self.processor(images=frames, return_tensors="pt")
        pixels = out["pixel_values"][:, 0]  # [frames, 3, S, S]
        v = self.config.vision_config
        half = math.ceil(v.image_size // v.patch_size / 2)
        return {"pixel_values": pixels, "video": True}, len(frames) * half * half + 1

    def positions_of(self, height: int, width: int) -> int:
        v = self.config.vision_config
        side = v.image_size // v.patch_size
        gh, gw = best_grid(height, width, self.config.image_grid_pinpoints)
        rows, cols = gh // v.image_size * side, gw // v.image_size * side
        top, bottom, left, right = unpadded_map(height, width, rows, cols)
        rows, cols = _shrunk(bottom - top, right - left, side, _max_tiles(self.config))
        return side * side + rows * (cols + 1)

    def several(self, data: dict, n: int, *rest: Any) -> tuple:
        """One of several images of a request: its base tile only, and a newline."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        data = {**data, "pixel_values": data["pixel_values"][:1], "multi": True}
        return (data, side * side + 1, *rest)


LlavaOnevisionForConditionalGeneration.image_inputs = LlavaOnevisionImageInputs
