"""BERT-family cross-encoders (BertForSequenceClassification: ms-marco MiniLM rerankers;
XLMRobertaForSequenceClassification: bge-reranker): the encoder of bert.py with token types, BERT's
pooler (dense + tanh on [CLS]) and the classification head, as HF transformers' modelling
(transformers/models/bert/modeling_bert.py: BertEmbeddings, BertPooler,
BertForSequenceClassification) defines them.

A pair is one sequence `[CLS] query [SEP] document [SEP]`; its token types (0 up to and
including the first [SEP], 1 after) are derived here from the ids, so the worker's batch
needs nothing new: `sep_token_id` is set from the tokenizer when the model is served.
`classify(cls_hidden)` gives the head's logits [B, num_labels].
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from asgl.engine.contracts.forward_batch import ForwardBatch
from asgl.layers.quant import QuantizationConfig
from asgl.models.bert import BertModel, _our_name
from asgl.models.weights import assign_weights


class BertForSequenceClassification(BertModel):
    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None):
        super().__init__(config, quant_config)
        h = config.hidden_size
        self.num_labels = int(getattr(config, "num_labels", 1))
        self.pooler = nn.Linear(h, h)
        self.classifier = nn.Linear(h, self.num_labels)
        self.sep_token_id: Optional[int] = getattr(config, "sep_token_id", None)
        self.position_offset = 0  # RoBERTa's positions start after its padding index

    def token_types(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """1 after a sequence's first [SEP], else 0 (sequences are packed; each starts at
        position 0)."""
        if self.sep_token_id is None:
            return torch.zeros_like(input_ids)
        is_sep = (input_ids == self.sep_token_id).long()
        before = torch.cumsum(is_sep, 0) - is_sep  # [SEP]s before each token, in the batch
        seq = torch.cumsum((positions == 0).long(), 0) - 1
        starts = torch.nonzero(positions == 0).flatten()
        within = before - before[starts][seq]
        limit = self.embeddings.token_type_embeddings.num_embeddings - 1
        return (within > 0).long().clamp(max=limit)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        if batch.kv_pool is not None:
            raise ValueError("BERT is an encoder: run it without a KV pool")
        e = self.embeddings
        x = e.word_embeddings(input_ids) + e.token_type_embeddings(
            self.token_types(input_ids, positions))
        x = e.LayerNorm(x + e.position_embeddings(positions + self.position_offset))
        for layer in self.layers:
            x = layer(x, batch)
        return x

    def classify(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(cls_hidden)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def mapped():
            for hf_name, tensor in weights:
                name = hf_name.removeprefix("bert.")
                if name.startswith("pooler.dense."):
                    yield hf_name, "pooler." + name[len("pooler.dense."):], tensor, None
                elif name.startswith("classifier."):
                    yield hf_name, name, tensor, None
                else:
                    ours = _our_name(hf_name)
                    if ours is not None:
                        yield hf_name, ours[0], tensor, ours[1]
        assign_weights(self, mapped())


class XLMRobertaForSequenceClassification(BertForSequenceClassification):
    """XLM-RoBERTa cross-encoders (bge-reranker-base / -large, mxbai-rerank): BERT's layers,
    positions counted from padding_idx + 1, no token types (all 0), and RoBERTa's head
    (`classifier.dense` + tanh + `classifier.out_proj` on <s>), as HF transformers'
    modeling_xlm_roberta.py (XLMRobertaEmbeddings, XLMRobertaClassificationHead) has them."""

    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None):
        super().__init__(config, quant_config)
        self.position_offset = int(getattr(config, "pad_token_id", 1)) + 1
        self.max_positions -= self.position_offset

    def token_types(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(input_ids)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def mapped():
            for hf_name, tensor in weights:
                name = hf_name.removeprefix("roberta.")
                if name.startswith("classifier.dense."):
                    yield hf_name, "pooler." + name[len("classifier.dense."):], tensor, None
                elif name.startswith("classifier.out_proj."):
                    yield hf_name, "classifier." + name[len("classifier.out_proj."):], \
                        tensor, None
                elif not name.startswith("pooler."):  # unused by the classifier
                    ours = _our_name(name)
                    if ours is not None:
                        yield hf_name, ours[0], tensor, ours[1]
        assign_weights(self, mapped())
