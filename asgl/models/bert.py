"""BERT encoders for embeddings (all-MiniLM, bge, e5, gte-base, ...).

Learned absolute positions plus token types, post-LN layers (norm after each residual
add), bidirectional attention through the step's attention backend in encoder mode
(`batch.kv_pool is None`, `spec.causal=False`): each sequence attends over its own tokens
only and nothing is cached. `forward` returns the last hidden states [T, hidden], which
the Embedder pools (CLS by default, or the sentence-transformers pooling config).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from asgl.engine.contracts.forward_batch import ForwardBatch
from asgl.layers.attention import Attention
from asgl.layers.embedding import VocabParallelEmbedding
from asgl.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from asgl.layers.quant import QuantizationConfig
from asgl.models.weights import assign_weights

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}

# Checkpoint module (inside encoder.layer.{i}.) -> ours (inside layers.{i}.), fused shard.
_LAYER_NAMES: dict[str, tuple[str, Any]] = {
    "attention.self.query": ("attention.qkv_proj", "q"),
    "attention.self.key": ("attention.qkv_proj", "k"),
    "attention.self.value": ("attention.qkv_proj", "v"),
    "attention.output.dense": ("attention.out_proj", None),
    "attention.output.LayerNorm": ("attention.norm", None),
    "intermediate.dense": ("mlp.up_proj", None),
    "output.dense": ("mlp.down_proj", None),
    "output.LayerNorm": ("mlp.norm", None),
}
_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
# Heads and buffers that embedding never uses: the NSP/MLM heads, BERT's tanh pooler
# (sentence-transformers pools the hidden states itself), stored position ids.
_SKIPPED = ("pooler.", "cls.", "embeddings.position_ids")


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Every input is one segment: token type 0, as sentence-transformers sends it.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x + self.position_embeddings(positions))


class BertAttention(nn.Module):
    def __init__(self, config: Any, layer_id: int, quant_config: Optional[QuantizationConfig],
                 prefix: str):
        super().__init__()
        h, heads = config.hidden_size, config.num_attention_heads
        head_dim = h // heads
        self.qkv_proj = QKVParallelLinear(h, head_dim, heads, heads, True,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, head_dim ** -0.5,
                              self.qkv_proj.num_kv_heads, layer_id, causal=False)
        self.out_proj = RowParallelLinear(h, h, True, quant_config=quant_config,
                                          prefix=f"{prefix}.out_proj")
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.norm(self.out_proj(self.attn(q, k, v, batch)) + x)


class BertMLP(nn.Module):
    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig], prefix: str):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BERT activation {config.hidden_act!r} is not supported")
        self.act = _ACTIVATIONS[config.hidden_act]
        self.up_proj = ColumnParallelLinear(h, i, True, quant_config=quant_config,
                                            prefix=f"{prefix}.up_proj")
        self.down_proj = RowParallelLinear(i, h, True, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down_proj(self.act(self.up_proj(x))) + x)


class BertLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, quant_config: Optional[QuantizationConfig],
                 prefix: str):
        super().__init__()
        self.attention = BertAttention(config, layer_id, quant_config, f"{prefix}.attention")
        self.mlp = BertMLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.mlp(self.attention(x, batch))


class BertModel(nn.Module):
    """The encoder without heads; `forward` gives the last hidden states [T, hidden]."""

    default_pooling = "cls"  # without a sentence-transformers config, as SGLang does

    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None):
        super().__init__()
        kind = getattr(config, "position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"BERT position_embedding_type {kind!r} is not supported")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config, i, quant_config, f"layers.{i}")
                                    for i in range(config.num_hidden_layers))
        # Learned positions: longer inputs have no embedding (the Embedder caps its context).
        self.max_positions = int(config.max_position_embeddings)
        attn = self.layers[0].attention.attn.spec
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        if batch.kv_pool is not None:
            raise ValueError("BERT is an encoder: run it without a KV pool")
        x = self.embeddings(input_ids, positions)
        for layer in self.layers:
            x = layer(x, batch)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("BertModel has no LM head: it serves embeddings (--is-embedding)")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF BERT names (with or without the `bert.` prefix of task models)."""
        assign_weights(self, _map_weights(weights))


def _map_weights(weights: Iterable[tuple[str, torch.Tensor]]):
    for hf_name, tensor in weights:
        mapped = _our_name(hf_name)
        if mapped is not None:
            name, shard_id = mapped
            yield hf_name, name, tensor, shard_id


def _our_name(name: str) -> Optional[tuple[str, Any]]:
    """(our parameter name, shard id) for a checkpoint name; None for tensors we skip."""
    name = name.removeprefix("bert.")
    if name.startswith(_SKIPPED):
        return None
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    m = _LAYER_RE.match(name)
    if m is None:
        return name, None  # embeddings.*: our names are the checkpoint's
    layer, module, kind = m.groups()
    if module not in _LAYER_NAMES:
        return name, None  # matches no parameter: the caller names it in its error
    ours, shard = _LAYER_NAMES[module]
    return f"layers.{layer}.{ours}.{kind}", shard
