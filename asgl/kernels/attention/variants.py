"""Which attention variants the GPU backends (FlashInfer, Triton) lack, in one place.

A layer whose spec needs one of them runs on the torch backend instead (the model runner
logs the fallback; a backend asked for by name refuses). Partial / half-head rotary
(GLM, StableLM, Qwen's rotary_pct) is not an attention variant: the rotary layer applies
it before attention, on every backend."""

from __future__ import annotations

from typing import Optional

from asgl.engine.contracts.attention import AttentionSpec


def gpu_backend_gap(spec: AttentionSpec) -> Optional[str]:
    """Why FlashInfer and Triton cannot run this layer; None when they can."""
    if spec.alibi_slopes is not None:
        return "ALiBi position biases (BaiChuan 13B) are not implemented"
    return None
