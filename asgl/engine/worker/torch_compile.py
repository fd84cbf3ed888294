"""`--enable-torch-compile`: the model's forward through torch.compile (inductor) for small
batches.

Attention stays out of the compiled graphs: each layer's `Attention` call is a graph break
(the backends plan and launch their own kernels and hold Python state), so inductor compiles
the stretches between two attentions (o_proj, residual + RMSNorm, gate/up, SiLU-and-mul, down,
the next norm, QKV split and rotary) and fuses their elementwise work. Inside a compiled graph
the layers take their torch reference path (`asgl.layers.fused.use_fused`): inductor generates
the fused kernels itself, and it cannot trace our hand-written launchers.

Batches of at most `max_tokens` tokens run compiled (SGLang's `--torch-compile-max-bs`): at
batch 1 a decode step is a chain of small kernels, where fusing pays; large batches are
matmul-bound and run eagerly. On CUDA those batches are captured inside the CUDA graphs, so
the guards' Python runs at capture only. Shapes are static for the first batch size and
dynamic from the first recompilation on: one further graph serves every other size.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any, Callable

import torch

from asgl.config import ConfigError
from asgl.layers.attention import Attention

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 32
# Compiled variants dynamo keeps per code object (every layer shares its code): the static
# first size and the dynamic graph, with headroom for guard variants.
_CACHE_SIZE_LIMIT = 64


class CompiledForward:
    """`model.forward` compiled, and which batches should use it."""

    def __init__(self, model: torch.nn.Module, device: torch.device, max_tokens: int):
        _check_toolchain(device)
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                    _CACHE_SIZE_LIMIT)
        for module in model.modules():
            if isinstance(module, Attention):
                # an instance attribute: eager callers of the class keep the plain method
                module.forward = torch.compiler.disable(module.forward)
        self.max_tokens = max_tokens
        self.forward: Callable[..., torch.Tensor] = torch.compile(model.forward, dynamic=True)
        logger.info("torch.compile on for batches of up to %d tokens (compiles on first use; "
                    "on CUDA during graph capture)", max_tokens)

    def wants(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens


def _check_toolchain(device: torch.device) -> None:
    """Inductor builds C++ on the CPU and Triton on CUDA: fail at start-up, not mid-serving."""
    if device.type == "cpu":
        if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
            raise ConfigError("--enable-torch-compile on the CPU needs a C++ compiler (g++)")
        return
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--enable-torch-compile needs triton on {device.type}: {exc}") from None


def compiled_forward(cfg: Any, model: torch.nn.Module,
                     device: torch.device) -> CompiledForward | None:
    """The compiled forward `cfg` asks for, or None."""
    if not cfg.enable_torch_compile:
        return None
    return CompiledForward(model, device, cfg.torch_compile_max_bs or DEFAULT_MAX_TOKENS)
