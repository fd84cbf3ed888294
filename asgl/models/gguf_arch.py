"""What the GGUF conversion (gguf_loader.py) needs to know per llama.cpp architecture beyond
`llama`: the transformers config from the file's metadata, llama.cpp's tensor names, and the
changes llama.cpp's converter made to the tensors that must be undone.

Architectures: qwen2, qwen3, gemma, gemma2, gemma3, phi3, stablelm, command-r (Cohere),
qwen2moe, qwen3moe (experts stacked as llama.cpp stores them).
What llama.cpp's converter did to them, undone here:
- Gemma 1/2/3 store every norm weight as 1 + w (llama.cpp's RMSNorm multiplies by the
  weight as is; HF Gemma stores the offset): we subtract 1.
- Only `llama` (and its relatives) had q/k rows permuted for llama.cpp's RoPE: the others
  are stored in HF order.
- Phi-3 keeps HF's fused qkv_proj and gate_up_proj (attn_qkv, ffn_up), and LongRoPE's
  factors as the tensors rope_factors_long / rope_factors_short.
Fields a GGUF does not store take llama.cpp's own rule: Gemma 2/3's query_pre_attn_scalar is
the head dim except for the 27B models (hidden / heads), Gemma 3's local RoPE base is 10000
and its sliding pattern 5:1.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

ARCHITECTURES = ("qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "stablelm",
                 "command-r", "qwen2moe", "qwen3moe")
# Mixture-of-experts architectures: llama.cpp stacks each layer's experts into one tensor
# per projection (ffn_gate_exps [E, I, H], ...), kept stacked under
# `mlp.experts.{gate,up,down}_proj.weight`, names FusedMoE's loader takes whole.
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe")

_COMMON = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_SANDWICH = {"post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm"}

# llama.cpp name after "blk.N." -> HF name after "model.layers.N."
LAYER_NAMES: dict[str, dict[str, str]] = {
    "qwen2": _COMMON,
    "qwen3": {**_COMMON, **_QK_NORM},
    "gemma": _COMMON,
    "gemma2": {**_COMMON, **_SANDWICH},
    "gemma3": {**_COMMON, **_SANDWICH, **_QK_NORM},
    "phi3": {**_COMMON, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "stablelm": _COMMON,
    "command-r": {**_COMMON, **_QK_NORM},
}
_MOE = {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj",
        "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj",
        "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
        "ffn_up_shexp": "mlp.shared_expert.up_proj",
        "ffn_down_shexp": "mlp.shared_expert.down_proj",
        "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
LAYER_NAMES["qwen2moe"] = {**_COMMON, **_MOE}
LAYER_NAMES["qwen3moe"] = {**_COMMON, **_QK_NORM, **_MOE}
# Tensors folded into the config instead of a parameter.
CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

# Chat end-of-turn tokens: generation must stop on them although the GGUF's eos id is the
# end-of-text token (llama.cpp recognizes them by text the same way).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|end|>", "<|im_end|>", "<|eot_id|>",
                      "<|END_OF_TURN_TOKEN|>")

# Gemma GGUFs often carry no chat template; this is Gemma's documented turn format (no
# system role: a system message opens the first user turn).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role'])"
    " + '\n' + ns.system + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")


def default_chat_template(arch: str) -> Optional[str]:
    return GEMMA_CHAT_TEMPLATE if arch in ("gemma", "gemma2", "gemma3") else None


def config_fields(meta: Any, arch: str, tensors: dict[str, Any],
                  dequantize: Callable[[Any], np.ndarray]) -> dict[str, Any]:
    """The transformers config fields (model_type, architectures, ...) of a GGUF of `arch`.
    `meta.get/require` read metadata; `dequantize(tensor)` reads a small tensor."""
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    hidden = meta.require(f"{arch}.embedding_length")
    heads = meta.require(f"{arch}.attention.head_count")
    layers = meta.require(f"{arch}.block_count")
    head_dim = g("attention.key_length") or hidden // heads
    vocab = g("vocab_size") or meta.array_len("tokenizer.ggml.tokens") \
        or int(tensors["token_embd.weight"].shape[-1])

    def eps(key: str, default: float) -> float:
        # stored as float32 (1e-5 reads 9.9999997e-06): round it back
        return float(f"{g(key, default):.7g}")

    fields: dict[str, Any] = {
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": meta.require(f"{arch}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv", heads), "head_dim": head_dim,
        "max_position_embeddings": g("context_length", 2048),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "rms_norm_eps": eps("attention.layer_norm_rms_epsilon", 1e-6),
        "hidden_act": "silu",
    }
    rotary = g("rope.dimension_count")
    if rotary and rotary != head_dim:
        fields["partial_rotary_factor"] = rotary / head_dim
    if arch in ("qwen2", "qwen3"):
        fields.update(model_type=arch, architectures=[f"Qwen{arch[-1]}ForCausalLM"],
                      attention_bias="blk.0.attn_q.bias" in tensors, use_sliding_window=False)
    elif arch in MOE_ARCHITECTURES:
        # llama.cpp makes every layer sparse; it renormalizes Qwen3-MoE's top-k, not
        # Qwen2-MoE's (neither flag is stored)
        version = arch[4]
        fields.update(model_type=f"qwen{version}_moe",
                      architectures=[f"Qwen{version}MoeForCausalLM"],
                      num_experts=meta.require(f"{arch}.expert_count"),
                      num_experts_per_tok=meta.require(f"{arch}.expert_used_count"),
                      moe_intermediate_size=g("expert_feed_forward_length",
                                              fields["intermediate_size"]),
                      norm_topk_prob=arch == "qwen3moe", decoder_sparse_step=1,
                      mlp_only_layers=[], use_sliding_window=False)
        if arch == "qwen2moe":
            fields.update(qkv_bias="blk.0.attn_q.bias" in tensors,
                          shared_expert_intermediate_size=g(
                              "expert_shared_feed_forward_length", fields["intermediate_size"]))
        else:
            fields["attention_bias"] = "blk.0.attn_q.bias" in tensors
    elif arch.startswith("gemma"):
        fields.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                      tie_word_embeddings=True)
        big = {"gemma2": 46, "gemma3": 62}.get(arch) == layers  # the 27B models
        scalar = hidden // heads if big else head_dim
        if arch == "gemma":
            fields.update(model_type="gemma", architectures=["GemmaForCausalLM"])
        elif arch == "gemma2":
            fields.update(model_type="gemma2", architectures=["Gemma2ForCausalLM"],
                          query_pre_attn_scalar=scalar,
                          sliding_window=g("attention.sliding_window", 4096),
                          attn_logit_softcapping=g("attn_logit_softcapping", 50.0),
                          final_logit_softcapping=g("final_logit_softcapping", 30.0))
        else:
            fields.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                          query_pre_attn_scalar=scalar, rope_local_base_freq=10000.0,
                          sliding_window=g("attention.sliding_window", 4096),
                          attn_logit_softcapping=None, final_logit_softcapping=None)
            pattern = g("attention.sliding_window_pattern")
            if isinstance(pattern, int) and pattern > 0:
                fields["sliding_window_pattern"] = pattern
            if g("rope.scaling.type") == "linear" and g("rope.scaling.factor"):
                fields["rope_scaling"] = {"rope_type": "linear",
                                          "factor": float(g("rope.scaling.factor"))}
    elif arch == "phi3":
        fields.update(model_type="phi3", architectures=["Phi3ForCausalLM"],
                      rms_norm_eps=eps("attention.layer_norm_rms_epsilon", 1e-5),
                      sliding_window=g("attention.sliding_window"),
                      original_max_position_embeddings=g(
                          "rope.scaling.original_context_length", fields["max_position_embeddings"]))
        if "rope_factors_long.weight" in tensors:
            fields["rope_scaling"] = {
                "rope_type": "longrope",
                "long_factor": dequantize(tensors["rope_factors_long.weight"]).tolist(),
                "short_factor": dequantize(tensors["rope_factors_short.weight"]).tolist()}
            attn = g("rope.scaling.attn_factor")
            if attn:
                fields["rope_scaling"]["attention_factor"] = float(attn)
    elif arch == "stablelm":
        fields.update(model_type="stablelm", architectures=["StableLmForCausalLM"],
                      layer_norm_eps=eps("attention.layer_norm_epsilon", 1e-5),
                      use_qkv_bias="blk.0.attn_q.bias" in tensors,
                      use_parallel_residual="blk.0.ffn_norm.weight" not in tensors,
                      qk_layernorm="blk.0.attn_q_norm.weight" in tensors)
    elif arch == "command-r":
        fields.update(model_type="cohere", architectures=["CohereForCausalLM"],
                      layer_norm_eps=eps("attention.layer_norm_epsilon", 1e-5),
                      logit_scale=float(g("logit_scale", 1.0)),
                      use_qk_norm="blk.0.attn_q_norm.weight" in tensors)
    else:
        raise ValueError(f"no GGUF config mapping for {arch!r}")
    return fields


def hf_tensor_name(arch: str, gguf_name: str) -> Optional[str]:
    """HF name of a llama.cpp tensor of `arch`; None when it is folded into the config.
    Raises KeyError for a tensor without a mapping."""
    if gguf_name in CONFIG_TENSORS:
        return None
    base, _, suffix = gguf_name.rpartition(".")
    globals_ = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                "output": "lm_head"}
    if base in globals_:
        return f"{globals_[base]}.{suffix}"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES[arch]:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[arch][parts[2]]}.{parts[3]}"
    raise KeyError(gguf_name)


def fix_tensor(arch: str, hf_name: str, w: torch.Tensor) -> torch.Tensor:
    """Undo what llama.cpp's converter changed in the tensor (see the module docstring)."""
    if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
        return w - 1.0
    if hf_name.endswith("shared_expert_gate.weight") and w.dim() == 1:
        return w[None]  # llama.cpp stores Qwen2-MoE's [1, H] gate as [H]
    return w
