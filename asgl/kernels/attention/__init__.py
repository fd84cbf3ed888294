"""Attention backends behind one interface (see base.py); pick one with
`create_attention_backend(name)`."""

from __future__ import annotations

from typing import Any, Callable

from asgl.engine.contracts.attention import AttentionBackend, AttentionSpec


def _torch(**kw: Any) -> AttentionBackend:
    from asgl.kernels.attention.torch_native import TorchNativeBackend
    return TorchNativeBackend(**kw)


# Imported lazily: the triton and flashinfer backends need packages the CPU machines lack.
_BACKENDS: dict[str, Callable[..., AttentionBackend]] = {"torch": _torch}


def _triton(**kw: Any) -> AttentionBackend:
    from asgl.kernels.attention.triton_backend import TritonAttnBackend
    return TritonAttnBackend(**kw)


def register_attention_backend(name: str, factory: Callable[..., AttentionBackend]) -> None:
    _BACKENDS[name] = factory


def create_attention_backend(name: str, **kw: Any) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; "
                         f"choices: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name](**kw)


register_attention_backend("triton", _triton)


def _flashinfer(**kw: Any) -> AttentionBackend:
    from asgl.kernels.attention.flashinfer_backend import FlashInferBackend
    return FlashInferBackend(**kw)


register_attention_backend("flashinfer", _flashinfer)


def _flashinfer_mla(**kw: Any) -> AttentionBackend:
    from asgl.kernels.attention.flashinfer_mla_backend import FlashInferMLABackend
    return FlashInferMLABackend(**kw)


# MLA models (latent KV) on `--attention-backend flashinfer` (model_runner picks it)
register_attention_backend("flashinfer_mla", _flashinfer_mla)


__all__ = ["AttentionBackend", "AttentionSpec", "create_attention_backend",
           "register_attention_backend"]
