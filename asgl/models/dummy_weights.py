"""Dummy (random) weights for benchmarks: `--load-format dummy`.

Under tensor parallelism they equal the TP=1 ones:

`init_dummy_weights` draws each parameter in `named_parameters()` order from one generator
per device. A sharded parameter is smaller, so drawing it directly would give every TP size
other weights, and "TP=N matches TP=1" could not be checked with `--load-format dummy`.
Instead each rank builds a shape template of the unsharded model on the meta device (no
memory), draws every full tensor in the TP=1 order and hands it to the parameter's own
`weight_loader`, which keeps this rank's slice exactly as it would from a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from asgl.distributed import get_tp_size, single_rank_view
from asgl.layers.embedding import VocabParallelEmbedding
from asgl.layers.utils import default_weight_loader


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter in place: N(0, 0.02) for matrices, ones for norm weights, zeros
    for biases. Values are drawn on each parameter's own device, so it is fast on a GPU.

    Under tensor parallelism every rank draws the unsharded tensors in the same order and
    keeps its slice, so TP=N gets the very weights of TP=1 (`init_sharded_dummy_weights`)."""
    if get_tp_size() > 1:
        return init_sharded_dummy_weights(model, seed)
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        fill_dummy(name, param.data, generators, seed)


def fill_dummy(name: str, data: torch.Tensor, generators: dict[torch.device, torch.Generator],
               seed: int) -> None:
    """Fill one parameter as `init_dummy_weights` does; draws come from `generators`, one
    per device, created with `seed` on first use."""
    if name.endswith("bias"):
        data.zero_()
    elif name.endswith("norm.weight") or data.dim() == 1 or name.endswith(("_scale",
                                                                           "_scale_inv")):
        data.fill_(1.0)
    elif not data.is_floating_point():
        data.zero_()  # packed integer (quantized) storage: any bit pattern is valid
    else:
        gen = generators.get(data.device)
        if gen is None:
            gen = torch.Generator(device=data.device).manual_seed(seed)
            generators[data.device] = gen
        if data.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            data.normal_(0.0, 0.02, generator=gen)
        else:  # e.g. fp8: normal_ is not implemented, so draw in bf16 and cast
            tmp = torch.empty(data.shape, dtype=torch.bfloat16, device=data.device)
            data.copy_(tmp.normal_(0.0, 0.02, generator=gen))


@torch.no_grad()
def init_sharded_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    config = getattr(model, "config", None)
    if config is None:
        raise NotImplementedError(f"{type(model).__name__} keeps no `config`: cannot build "
                                  "its unsharded shapes for dummy weights under TP")
    quant_config = getattr(model, "quant_config", None)  # the same quantized layers
    with single_rank_view(), torch.device("meta"):
        template = type(model)(config) if quant_config is None else \
            type(model)(config, quant_config)
    params = dict(model.named_parameters())
    vocab_rows = {f"{mod_name}.{p_name}".lstrip("."): module.num_embeddings
                  for mod_name, module in model.named_modules()
                  if isinstance(module, VocabParallelEmbedding)
                  for p_name, _ in module.named_parameters(recurse=False)}
    generators: dict[torch.device, torch.Generator] = {}
    for name, shape_of in template.named_parameters():
        param = params[name]
        full = torch.empty(shape_of.shape, dtype=param.dtype, device=param.device)
        fill_dummy(name, full, generators, seed)
        if name in vocab_rows:  # TP=1 pads the vocabulary less: drop its padding rows
            full = full[:vocab_rows[name]]
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, full)
