"""Reading a compressed-tensors `quantization_config` (llmcompressor's output), without torch.

What runs: format `float-quantized` with 8-bit float weights, strategy tensor, channel or
block, and activations none (weight-only: run here with dynamic per-token activations),
dynamic per token / per group, or static per tensor; every config group the same scheme,
targeting Linear layers. Anything else is refused by name before weights load.
"""

from __future__ import annotations

from typing import Any, Optional

from asgl.layers.quantization.base import QuantizationError

_WHERE = "compressed-tensors checkpoint"


def _weights_scheme(w: dict) -> tuple[str, Optional[tuple[int, int]]]:
    if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
        raise QuantizationError(f"{_WHERE}: weights of type {w.get('type')} with "
                                f"{w.get('num_bits')} bits; only 8-bit float (FP8) runs")
    if w.get("dynamic"):
        raise QuantizationError(f"{_WHERE}: dynamic weight quantization is not supported")
    strategy = w.get("strategy", "tensor")
    if strategy == "block":
        bs = w.get("block_structure") or [128, 128]
        return "block", (int(bs[0]), int(bs[1]))
    if strategy not in ("tensor", "channel"):
        raise QuantizationError(f"{_WHERE}: FP8 weight strategy {strategy!r} (runs: "
                                "tensor, channel, block)")
    return strategy, None


def _activation_scheme(a: Optional[dict]) -> str:
    if a is None:
        return "dynamic"  # weight-only checkpoint: the GPU path still quantizes per token
    if a.get("type") != "float" or int(a.get("num_bits", 0)) != 8:
        raise QuantizationError(f"{_WHERE}: activations of type {a.get('type')} with "
                                f"{a.get('num_bits')} bits; only FP8 runs")
    strategy = a.get("strategy", "tensor")
    if a.get("dynamic") and strategy in ("token", "group", "tensor"):
        return "dynamic"
    if not a.get("dynamic") and strategy == "tensor":
        return "static"
    raise QuantizationError(f"{_WHERE}: activation strategy {strategy!r} "
                            f"(dynamic={a.get('dynamic')}) is not supported")


def parse_compressed_tensors(qc: dict) -> dict[str, Any]:
    """{weight, activation, block, ignore} of the one scheme every group uses."""
    fmt = qc.get("format")
    if fmt != "float-quantized":
        raise QuantizationError(f"{_WHERE}: format {fmt!r}; only 'float-quantized' (FP8) "
                                "runs")
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise QuantizationError(f"{_WHERE}: no config_groups")
    schemes = set()
    for g in groups:
        targets = g.get("targets") or []
        if any(t not in ("Linear", "re:.*Linear") and not str(t).startswith("re:")
               for t in targets):
            raise QuantizationError(f"{_WHERE}: group targets {targets} (runs: Linear)")
        weight, block = _weights_scheme(g.get("weights") or {})
        act = _activation_scheme(g.get("input_activations"))
        if g.get("output_activations"):
            raise QuantizationError(f"{_WHERE}: output activation quantization")
        schemes.add((weight, block, act))
    if len(schemes) > 1:
        raise QuantizationError(f"{_WHERE}: groups with different schemes {sorted(schemes)}")
    weight, block, act = schemes.pop()
    return {"weight": weight, "block": block, "activation": act,
            "ignore": list(qc.get("ignore") or [])}


def check_compressed_tensors(qc: dict) -> None:
    parse_compressed_tensors(qc)
