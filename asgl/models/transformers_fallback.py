"""`--model-impl transformers`: any `AutoModelForCausalLM` architecture served through asgl's
KV pool, scheduler and radix cache, with transformers' own modelling code.

transformers 5 lets a model call a registered attention function (`AttentionInterface`)
in place of its own. We register one under the name "asgl" and build the HF model with
`attn_implementation="asgl"`: every layer's projections, norms and RoPE stay transformers',
while attention goes to the step's asgl backend (torch / triton / flashinfer), which writes
the new K/V into our pool and attends over each request's cached prefix. The whole step is
one flattened sequence of [1, T] tokens with each token's own position; transformers builds
no mask for an attention function it has no mask for, so nothing of size T x T is made.

The KV pool keeps its layout: one layer per HF `layer_idx`, with the config's KV heads and
head dim (an architecture whose layers differ there is refused when first run).

Slower than a native file (HF's unfused projections, no TP, no quantization) but a new
family runs on day one. Logits: the LM head plus the post-head transforms that configs
declare (`logit_scale`, `logits_scaling`, `final_logit_softcapping`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from typing import Any, Iterable, Optional

import torch
from torch import nn

from asgl.distributed import get_tp_size
from asgl.engine.contracts.forward_batch import ForwardBatch
from asgl.layers.attention import Attention
from asgl.models.weights import assign_weights

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "asgl"
# The step being run, set by `forward` around the HF call (the attention function has no
# other way to reach it: not every model passes extra keyword arguments down).
_BATCH: contextvars.ContextVar[Optional[ForwardBatch]] = contextvars.ContextVar(
    "asgl_transformers_batch", default=None)


def text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def transformers_supports(config: Any) -> bool:
    """Whether transformers itself (no remote code) has a causal-LM class for this config."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
    except Exception:  # noqa: BLE001 - a lazy mapping that fails to import a model
        return False


def _asgl_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    scaling: Optional[float] = None, dropout: float = 0.0,
                    sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q [1, H, T, D], k/v [1, Hkv, T, D] after RoPE;
    returns ([1, T, H, Dv], no weights)."""
    batch = _BATCH.get()
    if batch is None:
        raise RuntimeError("the asgl attention ran outside TransformersForCausalLM.forward")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("attention sinks are not supported by --model-impl "
                                  "transformers")
    attn: Attention = module.asgl_attn
    _, heads, T, head_dim = query.shape
    spec = attn.spec
    # what this call asks for; checked against the spec once per distinct call (cheap key)
    asked = (heads, key.shape[1], head_dim, value.shape[-1], scaling, sliding_window, softcap)
    if asked != getattr(module, "_asgl_asked", None):
        spec = _spec_for_call(attn, asked)
        module._asgl_asked = asked
    q = query[0].transpose(0, 1).reshape(T, -1)
    k = key[0].transpose(0, 1).reshape(T, -1)
    v = value[0].transpose(0, 1).reshape(T, -1)
    out = batch.attn_backend.forward(q, k, v, spec, batch)
    return out.view(1, T, heads, spec.v_dim), None


def _spec_for_call(attn: Attention, asked: tuple) -> Any:
    """The layer's spec as this call asks for it: the spec built from the config, unless
    the call says otherwise (then the call wins, logged; the KV layout must still fit)."""
    heads, kv_heads, head_dim, v_dim, scaling, sliding_window, softcap = asked
    spec = attn.spec
    want = dataclasses.replace(
        spec, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        v_head_dim=v_dim if v_dim != head_dim else None,
        scaling=float(scaling) if scaling is not None else head_dim ** -0.5,
        sliding_window=sliding_window or None, logit_cap=float(softcap or 0.0))
    if want != spec:  # the layer asked for other than its config said: trust the call
        if (want.num_kv_heads, want.head_dim, want.v_dim) != (spec.num_kv_heads, spec.head_dim,
                                                                spec.v_dim):
            raise NotImplementedError(
                f"layer {spec.layer_id} has {want.num_kv_heads} KV heads of dim "
                f"{want.head_dim}/{want.v_dim}; the KV pool holds {spec.num_kv_heads} of "
                f"{spec.head_dim}/{spec.v_dim} for every layer")
        logger.info("layer %d: attention spec %s (config gave %s)", spec.layer_id, want, spec)
        attn.spec = want
    return attn.spec


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _asgl_attention)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class TransformersForCausalLM(nn.Module):
    """An HF causal LM built from its config with asgl attention; the engine's model
    interface (`forward` -> hidden states, `compute_logits`, `load_weights`)."""

    def __init__(self, config: Any, quant_config: Any = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        if get_tp_size() > 1:
            raise NotImplementedError("--model-impl transformers runs on one GPU only "
                                      "(tensor parallelism needs a native model file)")
        if quant_config is not None:
            raise NotImplementedError("--model-impl transformers does not quantize")
        register_attention()
        self.config = config
        self.hf = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION,
                                                   dtype=torch.get_default_dtype())
        self.base = getattr(self.hf, self.hf.base_model_prefix)
        self.lm_head = self.hf.get_output_embeddings()
        text = text_config(config)
        self.num_layers = int(text.num_hidden_layers)
        self.num_kv_heads = int(getattr(text, "num_key_value_heads", None)
                                or text.num_attention_heads)
        self.head_dim = int(_head_dim(text))
        self._attach_attention(text)
        self.logit_scale = float(getattr(text, "logit_scale", None) or 1.0)
        if getattr(text, "logits_scaling", None):  # Granite divides
            self.logit_scale /= float(text.logits_scaling)
        self.final_logit_cap = float(getattr(text, "final_logit_softcapping", None) or 0.0)

    def _attach_attention(self, text: Any) -> None:
        """An asgl `Attention` (a fixed spec the runner and backend can plan for) on each HF
        attention module: those with a `layer_idx` and a softmax `scaling`."""
        found = 0
        for module in self.hf.modules():
            if not (hasattr(module, "layer_idx") and hasattr(module, "scaling")):
                continue
            window = getattr(module, "sliding_window", None)
            cap = getattr(module, "attn_logit_softcapping", None) or 0.0
            module.asgl_attn = Attention(int(text.num_attention_heads), self.head_dim,
                                         float(module.scaling), self.num_kv_heads,
                                         int(module.layer_idx),
                                         sliding_window=window or None, logit_cap=float(cap))
            found += 1
        if found != self.num_layers:
            raise NotImplementedError(
                f"{type(self.hf).__name__}: found {found} attention layers with a layer_idx "
                f"for {self.num_layers} hidden layers; --model-impl transformers needs one "
                "per layer")

    def _apply(self, fn, recurse: bool = True):
        """`.to(dtype)` casts parameters only: float32 buffers (rotary frequencies, MoE
        router biases) stay float32, as transformers' own `from_pretrained(dtype=...)`
        leaves them."""
        keep = {name: buf for name, buf in self.named_buffers() if buf.dtype == torch.float32}
        out = super()._apply(fn, recurse)
        for name, old in keep.items():
            owner, _, attr = name.rpartition(".")
            module = self.get_submodule(owner) if owner else self
            new = module._buffers[attr]
            if new is not None and new.dtype != torch.float32:
                module._buffers[attr] = old.to(new.device)
        return out

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        token = _BATCH.set(batch)
        try:
            if input_embeds is not None:
                out = self.base(inputs_embeds=input_embeds[None], position_ids=positions[None],
                                use_cache=False)
            else:
                out = self.base(input_ids=input_ids[None], position_ids=positions[None],
                                use_cache=False)
        finally:
            _BATCH.reset(token)
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.final_logit_cap > 0:
            logits = torch.tanh(logits / self.final_logit_cap) * self.final_logit_cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checkpoint names are the HF model's own parameter names; a tied LM head and
        rotary buffers are skipped; every parameter must be filled."""
        params = dict(self.hf.named_parameters())
        tied = {name for name, _ in self.hf.named_parameters(remove_duplicate=False)} - set(params)

        def mapped():
            for name, tensor in weights:
                if name in tied or "rotary_emb." in name:
                    continue
                yield name, name, tensor, None
        assign_weights(self.hf, mapped())

    def load_from_source(self, source: Any) -> None:
        """Load a checkpoint directory. Names that are the model's own load directly (one
        copy of the weights); a checkpoint transformers converts on load (renamed layouts
        such as Exaone's, experts fused into one tensor in transformers 5 MoE models) goes
        through transformers' own `from_pretrained` instead, which briefly holds a second
        copy."""
        params = {name for name, _ in self.hf.named_parameters(remove_duplicate=False)}
        names = {name for name, _ in _names(source)}
        own = {n for n in names if "rotary_emb." not in n}
        if own <= params and set(dict(self.hf.named_parameters())) <= own:
            return self.load_weights(source.iter_weights())
        from transformers import AutoModelForCausalLM

        device = next(self.hf.parameters()).device
        logger.info("checkpoint names differ from %s's parameters: loading through "
                    "transformers' from_pretrained (its weight conversions)",
                    type(self.hf).__name__)
        del self.hf, self.base, self.lm_head
        self.hf = AutoModelForCausalLM.from_pretrained(
            source.weights_dir, config=self.config, attn_implementation=ATTN_IMPLEMENTATION,
            dtype=torch.get_default_dtype(), device_map={"": device}, local_files_only=True)
        self.base = getattr(self.hf, self.hf.base_model_prefix)
        self.lm_head = self.hf.get_output_embeddings()
        self._attach_attention(text_config(self.config))


def _names(source: Any) -> Iterable[tuple[str, None]]:
    """The checkpoint's tensor names, from the safetensors headers when it has them."""
    if source.weight_format == "safetensors":
        from safetensors import safe_open

        for path in source.weight_files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, None
        return
    for name, _ in source.iter_weights(progress=False):
        yield name, None
