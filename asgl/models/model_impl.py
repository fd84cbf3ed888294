"""`--model-impl`: which implementation serves a checkpoint.

- `native`: asgl's own model file for the config's architecture (registry.py), or an error
  listing the supported ones;
- `transformers`: transformers' modelling code with asgl attention
  (transformers_fallback.py), for any architecture transformers itself implements;
- `auto` (default): native when asgl has the architecture, else transformers (logged), else
  the native error. Code from a model directory never runs either way.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from asgl.models.registry import get_model_class

logger = logging.getLogger(__name__)

MODEL_IMPLS = ("auto", "native", "sglang", "transformers")  # sglang: SGLang's name for native


def resolve_model_class(hf_config: Any, model_impl: str = "auto",
                        is_embedding: bool = False) -> type[nn.Module]:
    from asgl.models import transformers_fallback as fallback

    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"--model-impl {model_impl!r}: choose one of {', '.join(MODEL_IMPLS)}")
    if model_impl == "sglang":
        model_impl = "native"
    archs = list(getattr(hf_config, "architectures", None) or [])
    if model_impl == "transformers":
        if is_embedding:
            raise ValueError("--model-impl transformers serves generative models only, not "
                             "--is-embedding")
        if not fallback.transformers_supports(hf_config):
            raise ValueError(f"--model-impl transformers: transformers has no causal-LM class "
                             f"for {archs} (model_type {getattr(hf_config, 'model_type', None)!r})")
        logger.info("model %s: transformers implementation (--model-impl transformers)", archs)
        return fallback.TransformersForCausalLM
    try:
        return get_model_class(archs, is_embedding=is_embedding)
    except ValueError as exc:
        if model_impl == "native" or is_embedding or not fallback.transformers_supports(hf_config):
            if model_impl == "auto" and not is_embedding:
                raise ValueError(f"{exc}; transformers has no class for it either (custom code "
                                 "from the model directory never runs)") from None
            raise
    logger.warning("architecture %s has no native asgl implementation: falling back to the "
                   "transformers implementation (--model-impl transformers; slower, one GPU); "
                   "--model-impl native refuses instead", archs)
    return fallback.TransformersForCausalLM
