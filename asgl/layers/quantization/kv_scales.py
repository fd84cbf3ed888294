"""FP8 KV-cache scales from a checkpoint (k_scale / v_scale), for `--kv-cache-dtype fp8_*`.

Checkpoints name them per attention layer in several ways, all taken here:
`self_attn.k_proj.k_scale` / `v_proj.v_scale` (ModelOpt, vLLM's fp8), `self_attn.k_scale` /
`v_scale` and `self_attn.attn.k_scale` (compressed-tensors, HF), and the older
compressed-tensors `k_proj.output_scale` / `v_proj.output_scale`. `KVScaleCollector.filter`
takes them out of the weight stream (models have no parameter for them), and `apply` hands
them to the attention layers when the cache is FP8: stored = k / k_scale. Without scales
the cache stores K and V as they are (scale 1.0), and the start-up log says so. Scales are
per tensor, so every tensor-parallel rank uses the same.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^(?:.*\.)?layers\.(\d+)\.self_attn\.(?:(?:k_proj|v_proj|attn)\.)?"
                   r"(k_scale|v_scale|q_scale|prob_scale|output_scale)$")
_PROJ = re.compile(r"\.(k_proj|v_proj)\.output_scale$")


class KVScaleCollector:
    def __init__(self) -> None:
        self.scales: dict[int, dict[str, float]] = {}

    def filter(self, weights: Iterable[tuple[str, torch.Tensor]]
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """The stream without KV-cache scale tensors, which are recorded instead."""
        for name, tensor in weights:
            m = _NAME.match(name)
            if m is None:
                yield name, tensor
                continue
            kind = m.group(2)
            if kind == "output_scale":
                proj = _PROJ.search(name)
                if proj is None:  # an output scale of another projection: not ours
                    yield name, tensor
                    continue
                kind = "k_scale" if proj.group(1) == "k_proj" else "v_scale"
            if kind in ("k_scale", "v_scale"):
                self.scales.setdefault(int(m.group(1)), {})[kind[0]] = \
                    float(tensor.float().max())
            # q_scale / prob_scale: FP8 attention math, which does not run here: dropped

    def apply(self, model: nn.Module, kv_dtype: torch.dtype) -> Optional[str]:
        """Set the scales on the model's attention layers when the cache is FP8; returns
        the log line (None for a 16/32-bit cache)."""
        from asgl.layers.attention import Attention

        if kv_dtype.itemsize != 1:
            if self.scales:
                logger.info("checkpoint KV-cache scales unused: the KV cache is %s",
                            str(kv_dtype).replace("torch.", ""))
            return None
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        found = 0
        for layer in layers:
            s = self.scales.get(layer.spec.layer_id, {})
            k, v = s.get("k"), s.get("v")
            found += k is not None or v is not None
            layer.set_kv_scales(None if k in (None, 1.0) else k, None if v in (None, 1.0) else v)
        name = str(kv_dtype).replace("torch.", "")
        if found:
            line = f"FP8 KV cache ({name}): K/V scales from the checkpoint for {found} of " \
                   f"{len(layers)} layers (the rest 1.0)"
        else:
            line = f"FP8 KV cache ({name}): the checkpoint has no K/V scales: using 1.0"
        logger.info(line)
        return line
