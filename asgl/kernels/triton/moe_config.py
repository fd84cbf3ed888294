"""Block sizes of the fused-MoE GEMMs, per shape and device (no triton import here).

A tuned table is a JSON file in `moe_configs/`, named after the device and the shape:
`E=<experts>,N=<intermediate per rank>,K=<hidden>,dtype=<bf16|fp16>,device=<name>.json`,
holding {"<tokens>": {"BLOCK_M": .., "BLOCK_N": .., "BLOCK_K": .., "GROUP_M": ..,
"num_warps": .., "num_stages": .., "down": {...}}, ...}; the entry of the nearest token
count (on a log scale, within a factor 2; else the default) is used. "down" (optional)
overrides BLOCK_N / BLOCK_K / GROUP_M / warps / stages for the down GEMM, whose shape differs
(N = hidden, K = intermediate); BLOCK_M is shared, as both GEMMs walk the same
expert-aligned row blocks.
`bench/gpu_moe.py tune` writes such files. Without one, `default_config` picks blocks
by how many rows each expert gets (decode: few, so small BLOCK_M and wide K tiles that
stream the weights; prefill: large square tiles).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Optional

import torch

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_configs")
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def config_file_name(E: int, N: int, K: int, dtype: torch.dtype, device: str) -> str:
    device = device.replace(" ", "_").replace("/", "_")
    return f"E={E},N={N},K={K},dtype={_DTYPES.get(dtype, str(dtype))},device={device}.json"


def default_config(M: int, E: int, N: int, K: int, top_k: int, dtype: torch.dtype) -> dict:
    if _interpreting():  # CPU tests: the smallest tiles tl.dot takes, fewer interpreted ops
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    rows_per_expert = M * top_k / E
    if rows_per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    # the gate-up kernel keeps two [BLOCK_M, BLOCK_N] float32 accumulators: 64 x 128 leaves
    # registers for the operands at 8 warps
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def get_config(M: int, E: int, N: int, K: int, top_k: int, dtype: torch.dtype) -> dict:
    """Block sizes for M tokens through E experts of [N, K] (gate-up: N = intermediate)."""
    table = _tuned_table(E, N, K, dtype, _device_name())
    if table:
        nearest = min(table, key=lambda m: abs(math.log2(m) - math.log2(max(M, 1))))
        # a table tuned for other batch sizes only (a partial tuning run) says nothing here
        if abs(math.log2(nearest) - math.log2(max(M, 1))) <= 1:
            return table[nearest]
    return default_config(M, E, N, K, top_k, dtype)


@functools.lru_cache(maxsize=None)
def _tuned_table(E: int, N: int, K: int, dtype: torch.dtype,
                 device: Optional[str]) -> dict[int, dict]:
    if device is None:
        return {}
    path = os.path.join(CONFIG_DIR, config_file_name(E, N, K, dtype, device))
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {int(m): cfg for m, cfg in json.load(f).items()}


@functools.lru_cache(maxsize=1)
def _device_name() -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
