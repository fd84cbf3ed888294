"""compressed-tensors FP8 checkpoints (`quant_method: compressed-tensors`, format
`float-quantized`, as llmcompressor writes them): weights `weight` (FP8) with `weight_scale`
([1] per tensor, [N, 1] per channel, [N / bn, K / bk] per block) and, for static
activations, `input_scale`. The config is read by ct_schemes.py; the layer is fp8.py's."""

from __future__ import annotations

from asgl.layers.quantization.base import Fp8Layout, QuantSpec
from asgl.layers.quantization.base import Fp8Layout, QuantSpec
from asgl.layers.quantization.ct_schemes import parse_compressed_tensors
from asgl.layers.quantization.fp8 import Fp8Config


class CompressedTensorsFp8Config(Fp8Config):
    name = "compressed-tensors"


def from_spec(spec: QuantSpec) -> Fp8Config:
    s = parse_compressed_tensors(spec.config)
    layout = Fp8Layout(s["weight"], s["activation"], s["block"], "weight_scale")
    return CompressedTensorsFp8Config(layout, s["ignore"])
