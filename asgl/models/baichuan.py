"""BaiChuan 1 and 2 (`BaiChuanForCausalLM`: Baichuan-7B; `BaichuanForCausalLM`: Baichuan-13B
and Baichuan 2 7B / 13B), after the published modelling files
(baichuan-inc/Baichuan2-7B-Base and Baichuan2-13B-Base, modeling_baichuan.py).

Llama's names, except q/k/v packed into `self_attn.W_pack` ([q | k | v], no bias).
Position encoding: RoPE for the 7B models, ALiBi for the 13B ones; the config does not
say which, so (as vLLM does) `BaichuanForCausalLM` with hidden size 4096 is the 7B (RoPE)
and any other size ALiBi. Baichuan 2 (its 125,696-token vocabulary) has a NormHead: the
LM head's rows are L2-normalized before use, done once here after loading.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from asgl.distributed import get_tp_rank
from asgl.models.remote_layout import RemoteLayoutLM, set_default

BAICHUAN2_VOCAB = 125696


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi slope of each head (Press et al.): a geometric sequence for a power-of-two
    head count, otherwise the closest power of two's, interleaved with every other slope of
    twice as many heads."""
    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][:num_heads - closest]


class BaiChuanForCausalLM(RemoteLayoutLM):
    """RoPE (Baichuan-7B, Baichuan 2 7B)."""

    renames = [(r"\.self_attn\.W_pack\.", ".self_attn.qkv_proj.")]
    use_alibi = False

    @classmethod
    def normalize_config(cls, config: Any) -> Any:
        # Baichuan-13B's config names its context model_max_length only
        set_default(config, "max_position_embeddings",
                    getattr(config, "model_max_length", None) or 4096)
        return super().normalize_config(config)

    def __init__(self, config: Any, quant_config: Any = None):
        super().__init__(config, quant_config)
        self.norm_head = int(config.vocab_size) == BAICHUAN2_VOCAB
        if self.use_alibi:  # no rotary: ALiBi biases the scores in the attention backend
            heads = config.num_attention_heads
            for layer in self.model.layers:
                attn = layer.self_attn
                attn.rotary_emb = None
                first = get_tp_rank() * attn.qkv_proj.num_heads
                slopes = alibi_slopes(heads)[first:first + attn.qkv_proj.num_heads]
                attn.attn.set_alibi_slopes(slopes)

    def _split(self, name, tensor):
        if ".qkv_proj." in name:
            return [(name, tensor, None)]  # [q | k | v]: our fused layout
        return super()._split(name, tensor)

    def load_weights(self, weights) -> None:
        super().load_weights(weights)
        if self.norm_head:  # NormHead: unit-norm rows (each rank holds whole rows)
            with torch.no_grad():
                w = self.lm_head.weight
                w.copy_(F.normalize(w.float(), dim=-1).to(w.dtype))


class BaichuanForCausalLM(BaiChuanForCausalLM):
    """Baichuan-13B and Baichuan 2 (7B with RoPE when hidden_size is 4096, else ALiBi)."""

    def __init__(self, config: Any, quant_config: Any = None):
        self.use_alibi = int(config.hidden_size) != 4096
        super().__init__(config, quant_config)
