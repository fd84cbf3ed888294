"""Dummy (random) weights under tensor parallelism that equal the TP=1 ones.

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

from asgl.distributed import single_rank_view
from asgl.layers.embedding import VocabParallelEmbedding
from asgl.layers.utils import default_weight_loader


@torch.no_grad()
def init_sharded_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    from asgl.models.loader import fill_dummy

    config = getattr(model, "config", None)
    if config is None:
        raise NotImplementedError(f"{type(model).__name__} keeps no `config`: cannot build "
                                  "its unsharded shapes for dummy weights under TP")
    with single_rank_view(), torch.device("meta"):
        template = type(model)(config)
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
