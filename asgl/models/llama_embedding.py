"""Decoder embedding models (e5-mistral, gte-Qwen2, Llama-based embedders): the Llama/Qwen2
decoder stack of llama.py without its LM head. `forward` returns the final (normed) hidden
states, which the Embedder pools (the last token by default).

Checkpoints come both as `*ForCausalLM` (names under `model.`, maybe an unused `lm_head`)
and as bare `*Model` (e5-mistral: names without the `model.` prefix); both load here.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from asgl.layers.quant import QuantizationConfig
from asgl.models.llama import LlamaForCausalLM, LlamaModel, Qwen2ForCausalLM, _head_dim


class LlamaEmbeddingModel(LlamaForCausalLM):
    default_pooling = "lasttoken"

    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None):
        # Not LlamaForCausalLM.__init__: that would allocate a vocab x hidden LM head that
        # embedding never reads.
        nn.Module.__init__(self)
        self.config = config
        qkv_bias, o_bias = self._attention_bias(config)
        self.model = LlamaModel(config, qkv_bias, o_bias, quant_config)
        self.tie_word_embeddings = False
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = self.model.layers[0].self_attn.qkv_proj.num_kv_heads
        self.head_dim = _head_dim(config)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("an embedding model has no LM head")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(_decoder_names(weights))


class Qwen2EmbeddingModel(LlamaEmbeddingModel):
    _attention_bias = staticmethod(Qwen2ForCausalLM._attention_bias)  # bias on q/k/v


def _decoder_names(weights: Iterable[tuple[str, torch.Tensor]]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        if name.startswith("lm_head."):
            continue
        yield (name if name.startswith("model.") else f"model.{name}"), tensor
