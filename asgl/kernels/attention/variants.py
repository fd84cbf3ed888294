"""Which attention variants FlashInfer lacks, in one place.

A model with a layer that needs one of them runs on the Triton backend instead (which has
every variant: windows, soft-caps, fp8 KV, ALiBi); the model runner logs the fallback, and
a FlashInfer asked for by name refuses. Partial / half-head rotary (GLM, StableLM, Qwen's
rotary_pct) is not an attention variant: the rotary layer applies it before attention, on
every backend."""

from __future__ import annotations

from typing import Optional

from asgl.engine.contracts.attention import AttentionSpec


def flashinfer_gap(spec: AttentionSpec) -> Optional[str]:
    """Why the FlashInfer backend cannot run this layer; None when it can."""
    if spec.alibi_slopes is not None:
        return "ALiBi position biases (BaiChuan 13B) are not wired to FlashInfer"
    return None
