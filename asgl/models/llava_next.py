"""LLaVA-NeXT / LLaVA 1.6 (`LlavaNextForConditionalGeneration`): LLaVA with "anyres" images.

Written from the LLaVA-NeXT release notes (Liu et al., Jan 2024, "LLaVA-NeXT: Improved
reasoning, OCR, and world knowledge") and HF's config fields (`image_grid_pinpoints`,
`image_newline`): an image is resized into the grid resolution (one of the pinpoints) that
keeps the most of it and wastes the least, cut into tower-sized tiles, and a downscaled
copy of the whole image (the "base" tile) is encoded too. The tiles' patch features are laid
out as one feature map, the rows and columns that only hold the grid's padding are dropped
(the map is cut back to the image's aspect ratio), and a learned `image_newline` vector
closes every row. Prompt order: the base tile's features, then the map row by row.

`anyres_positions` gives the number of positions an image of a given size fills (the
host needs it before the worker encodes anything); `pack` lays out the encoded features,
and the two agree by construction (tests/test_vlm_llava_next.py checks both against HF).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from asgl.engine.contracts.multimodal import MMItem
from asgl.layers.quant import QuantizationConfig
from asgl.models.llava import LlavaForConditionalGeneration, LlavaImageInputs


def best_grid(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (h, w) that shows the most of the image after an aspect-preserving
    resize into it, ties broken by the least padding."""
    best, best_shown, best_waste = None, -1, None
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        shown = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - shown
        if shown > best_shown or (shown == best_shown and waste < best_waste):
            best, best_shown, best_waste = (h, w), shown, waste
    return best


def unpadded_map(height: int, width: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the rows x cols feature map that hold the image itself
    (the rest is the letterbox padding of the resize into the grid)."""
    if width / height > cols / rows:  # wider than the map: bands above and below
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return pad, rows - pad, 0, cols
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return 0, rows, pad, cols - pad


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    # the feature strategy whose tiles hold exactly (image / patch)^2 features: CLIP's
    # "default" drops its class token; SigLIP (OneVision) has none, so "full"
    select_strategy = "default"

    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None):
        super().__init__(config, quant_config)
        if self.select != self.select_strategy:
            raise ValueError(f"{type(self).__name__} with vision_feature_select_strategy "
                             f"{self.select!r}: only {self.select_strategy!r} is supported")
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        v = config.vision_config
        self.tile, self.side = v.image_size, v.image_size // v.patch_size

    def encode_images(self, items: list[MMItem], device: torch.device) -> list[torch.Tensor]:
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        pixels = torch.cat([it.data["pixel_values"] for it in items]).to(device, dtype)
        feats = self.multi_modal_projector(self.tower_features(pixels))  # [tiles, side^2, D]
        out, start = [], 0
        for it in items:
            n = it.data["pixel_values"].shape[0]
            out.append(self.pack(feats[start:start + n], *it.data["image_size"]))
            start += n
        return out

    def _grid_map(self, tiles: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The tiles' features as one [rows, cols, D] map, cut back to the image's aspect."""
        gh, gw = best_grid(height, width, self.config.image_grid_pinpoints)
        th, tw, s, D = gh // self.tile, gw // self.tile, self.side, tiles.shape[-1]
        # tile (i, j), patch (r, c) -> map row i * s + r, column j * s + c
        grid = tiles.view(th, tw, s, s, D).permute(0, 2, 1, 3, 4).reshape(th * s, tw * s, D)
        top, bottom, left, right = unpadded_map(height, width, th * s, tw * s)
        return grid[top:bottom, left:right]

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        D = grid.shape[-1]
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, D)
        return torch.cat([grid, newline], dim=1).reshape(-1, D)

    def pack(self, feats: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[base + tiles, side^2, D] features of one image as its prompt positions."""
        base, tiles = feats[0], feats[1:]
        if tiles.shape[0] == 0:  # no grid (a single-tile config): base, then one newline
            return torch.cat([base, self.image_newline[None].to(base.dtype)])
        return torch.cat([base, self._with_newlines(self._grid_map(tiles, height, width))])


def anyres_positions(height: int, width: int, config: Any) -> int:
    """Prompt positions of an image of height x width (base tile + unpadded map + newlines)."""
    v = config.vision_config
    side = v.image_size // v.patch_size
    gh, gw = best_grid(height, width, config.image_grid_pinpoints)
    rows, cols = gh // v.image_size * side, gw // v.image_size * side
    top, bottom, left, right = unpadded_map(height, width, rows, cols)
    rows, cols = bottom - top, right - left
    return side * side + rows * (cols + 1)


class LlavaNextImageInputs(LlavaImageInputs):
    def process(self, image: Any) -> tuple[dict[str, Any], int]:
        out = self.processor(images=[image], return_tensors="pt")
        height, width = (int(x) for x in out["image_sizes"][0])
        gh, gw = best_grid(height, width, self.config.image_grid_pinpoints)
        tile = self.config.vision_config.image_size
        pixels = out["pixel_values"][0][:1 + (gh // tile) * (gw // tile)]  # (padded count)
        return ({"pixel_values": pixels, "image_size": (height, width)},
                self.positions_of(height, width))

    def positions_of(self, height: int, width: int) -> int:
        return anyres_positions(height, width, self.config)


LlavaNextForConditionalGeneration.image_inputs = LlavaNextImageInputs
