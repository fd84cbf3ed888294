"""HF `architectures` name -> model class, imported lazily (one module per family)."""

from __future__ import annotations

import importlib

from torch import nn

# architecture -> (module, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("asgl.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("asgl.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("asgl.models.llama", "Qwen2ForCausalLM"),
}


def register_model(architecture: str, module: str, class_name: str) -> None:
    _MODELS[architecture] = (module, class_name)


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architectures: list[str]) -> type[nn.Module]:
    """The class of the first supported name in `architectures` (the HF config's list)."""
    for arch in architectures or []:
        if arch in _MODELS:
            module, name = _MODELS[arch]
            return getattr(importlib.import_module(module), name)
    raise ValueError(f"model architecture {architectures} is not supported; supported: "
                     f"{', '.join(supported_architectures())}")
