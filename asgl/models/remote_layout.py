"""Shared pieces of the families whose published checkpoints carry their own modelling code
(`trust_remote_code` on the hub): InternLM 2, ChatGLM / GLM-4, Qwen (1), BaiChuan, MiniCPM,
Exaone 3, XVERSE, Yi. asgl never runs that code: each family here is the Llama decoder
(llama.py) with its config read into Llama's field names (`normalize_config`) and its
tensor names and packed tensors mapped onto our fused parameters (`_map_weights`).

`normalize_config` runs on the config the loader built (also a plain `PretrainedConfig`
read from config.json when transformers does not know the model type), so the engine's
readers of `vocab_size`, `max_position_embeddings` and the KV shapes see one vocabulary.
It is idempotent: the model runs it again on the config it is given.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Optional

import torch

from asgl.models.llama import LlamaForCausalLM

Mapped = Iterator[tuple[str, str, torch.Tensor, Optional[Any]]]


def set_default(config: Any, name: str, value: Any) -> None:
    """`config.name = value` unless the config already has a value for it."""
    if getattr(config, name, None) is None:
        setattr(config, name, value)


class RemoteLayoutLM(LlamaForCausalLM):
    """A Llama decoder loading a checkpoint whose tensor names follow `renames`
    ((regex, replacement) applied in order to every name); `skip` matches names that hold no
    weight (rotary caches some checkpoints store)."""

    renames: list[tuple[str, str]] = []
    skip: Optional[str] = r"rotary_emb\.inv_freq$|rotary_pos_emb\.inv_freq$"

    def __init__(self, config: Any, quant_config: Any = None):
        super().__init__(self.normalize_config(config), quant_config)

    @classmethod
    def normalize_config(cls, config: Any) -> Any:
        """Set the Llama field names from the family's own (in place; returns it)."""
        set_default(config, "num_key_value_heads", config.num_attention_heads)
        set_default(config, "hidden_act", "silu")
        set_default(config, "tie_word_embeddings", False)
        return config

    def _rename(self, name: str) -> str:
        for pattern, repl in self.renames:
            name = re.sub(pattern, repl, name)
        return name

    def _split(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor, Any]]:
        """Hook for packed tensors: (parameter name, tensor, shard id) pieces of one tensor;
        None as the shard loads a tensor whose layout is already our fused one."""
        for fused, piece, shard in self.stacked_params:
            if f".{piece}." in name:
                return [(name.replace(f".{piece}.", f".{fused}."), tensor, shard)]
        return [(name, tensor, None)]

    def _map_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Mapped:
        for source, tensor in weights:
            if self.skip and re.search(self.skip, source):
                continue
            name = self._rename(source)
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            for target, piece, shard in self._split(name, tensor):
                yield source, target, piece, shard
