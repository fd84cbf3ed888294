"""HF `architectures` name -> model class, imported lazily (one module per family).

Embedding engines (`--is-embedding`) look names up in `_EMBEDDING_MODELS` first: there a
decoder checkpoint maps to its stack without the LM head, and encoders (BERT) live only
there."""

from __future__ import annotations

import importlib

from torch import nn

# architecture -> (module, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("asgl.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("asgl.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("asgl.models.llama", "Qwen2ForCausalLM"),
    **{name: ("asgl.models.dense", name) for name in (
        "Qwen3ForCausalLM", "GraniteForCausalLM", "Olmo2ForCausalLM", "GemmaForCausalLM",
        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "StableLmForCausalLM",
        "CohereForCausalLM", "Cohere2ForCausalLM")},
    **{name: ("asgl.models.deepseek_v2", name) for name in (
        "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "MiniCPM3ForCausalLM")},
    **{name: ("asgl.models.moe", name) for name in (
        "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
        "DbrxForCausalLM")},
    # families published with their own modelling code (never run): remote_layout.py
    "InternLM2ForCausalLM": ("asgl.models.internlm2", "InternLM2ForCausalLM"),
    "ChatGLMModel": ("asgl.models.chatglm", "ChatGLMForCausalLM"),
    "ChatGLMForConditionalGeneration": ("asgl.models.chatglm", "ChatGLMForCausalLM"),
    "QWenLMHeadModel": ("asgl.models.qwen", "QWenLMHeadModel"),
    "BaiChuanForCausalLM": ("asgl.models.baichuan", "BaiChuanForCausalLM"),
    "BaichuanForCausalLM": ("asgl.models.baichuan", "BaichuanForCausalLM"),
    "MiniCPMForCausalLM": ("asgl.models.minicpm", "MiniCPMForCausalLM"),
    "ExaoneForCausalLM": ("asgl.models.exaone", "ExaoneForCausalLM"),
    "XverseForCausalLM": ("asgl.models.llama_aliases", "XverseForCausalLM"),
    "YiForCausalLM": ("asgl.models.llama_aliases", "YiForCausalLM"),
    "GlmForCausalLM": ("asgl.models.glm", "GlmForCausalLM"),
    "Glm4ForCausalLM": ("asgl.models.glm", "Glm4ForCausalLM"),
    "LlavaForConditionalGeneration": ("asgl.models.llava", "LlavaForConditionalGeneration"),
    "LlavaNextForConditionalGeneration": ("asgl.models.llava_next",
                                          "LlavaNextForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": ("asgl.models.qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "LlavaOnevisionForConditionalGeneration": ("asgl.models.llava_onevision",
                                               "LlavaOnevisionForConditionalGeneration"),
    "Grok1ModelForCausalLM": ("asgl.models.grok", "Grok1ModelForCausalLM"),
    "Grok1ForCausalLM": ("asgl.models.grok", "Grok1ForCausalLM"),
    "XverseMoeForCausalLM": ("asgl.models.xverse_moe", "XverseMoeForCausalLM"),
    "DeepseekForCausalLM": ("asgl.models.deepseek", "DeepseekForCausalLM"),
}

_LLAMA_EMB = ("asgl.models.llama_embedding", "LlamaEmbeddingModel")
_QWEN2_EMB = ("asgl.models.llama_embedding", "Qwen2EmbeddingModel")
_BERT = ("asgl.models.bert", "BertModel")
_EMBEDDING_MODELS: dict[str, tuple[str, str]] = {
    "BertModel": _BERT,
    "BertForMaskedLM": _BERT,
    "BertForPreTraining": _BERT,
    "BertForSequenceClassification": ("asgl.models.bert_classifier",  # cross-encoders
                                      "BertForSequenceClassification"),
    "XLMRobertaForSequenceClassification": ("asgl.models.bert_classifier",
                                            "XLMRobertaForSequenceClassification"),
    "LlamaModel": _LLAMA_EMB,
    "LlamaForCausalLM": _LLAMA_EMB,
    "MistralModel": _LLAMA_EMB,  # e5-mistral
    "MistralForCausalLM": _LLAMA_EMB,
    "Qwen2Model": _QWEN2_EMB,
    "Qwen2ForCausalLM": _QWEN2_EMB,  # gte-Qwen2
}


def register_model(architecture: str, module: str, class_name: str,
                   is_embedding: bool = False) -> None:
    (_EMBEDDING_MODELS if is_embedding else _MODELS)[architecture] = (module, class_name)


def supported_architectures(is_embedding: bool = False) -> list[str]:
    return sorted(_EMBEDDING_MODELS if is_embedding else _MODELS)


def get_model_class(architectures: list[str], is_embedding: bool = False) -> type[nn.Module]:
    """The class of the first supported name in `architectures` (the HF config's list);
    `is_embedding`: the class that returns hidden states for pooling."""
    table = _EMBEDDING_MODELS if is_embedding else _MODELS
    for arch in architectures or []:
        if arch in table:
            module, name = table[arch]
            return getattr(importlib.import_module(module), name)
    if not is_embedding and any(a in _EMBEDDING_MODELS for a in architectures or []):
        raise ValueError(f"model architecture {architectures} is an embedding model: "
                         "start it with --is-embedding (is_embedding=True)")
    kind = "embedding model" if is_embedding else "model"
    raise ValueError(f"{kind} architecture {architectures} is not supported; supported: "
                     f"{', '.join(supported_architectures(is_embedding))}")
