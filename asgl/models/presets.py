"""Built-in model configs for `--load-format dummy` (random weights, no download).

Each preset holds the fields of the model's published `config.json`, so a benchmark with dummy
weights has the real shapes (layers, heads, vocabulary, RoPE scaling). Names are matched
case-insensitively against the HF id (`meta-llama/Llama-3.1-8B`), its last part
(`Llama-3.1-8B`) and the short aliases (`llama-3.1-8b`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


@dataclass(frozen=True)
class Preset:
    name: str                                   # the HF model id
    config: dict[str, Any]                      # the published config.json fields
    aliases: tuple[str, ...] = ()
    description: str = ""

    def hf_config(self) -> PretrainedConfig:
        """The config as transformers would load it from the real config.json."""
        fields = dict(self.config)
        # from_dict, like AutoConfig on a file: transformers normalises the RoPE fields
        # (rope_theta/rope_scaling -> rope_parameters in v5) the same way for both.
        config = CONFIG_MAPPING[fields["model_type"]].from_dict(fields)
        config.name_or_path = self.name
        return config


_LLAMA3_ROPE_8K = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}

_LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "initializer_range": 0.02, "max_position_embeddings": 131072,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": _LLAMA3_ROPE_8K, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}

_MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral",
    "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "initializer_range": 0.02, "max_position_embeddings": 32768,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 32000,
}

_PRESETS: list[Preset] = [
    Preset("meta-llama/Llama-3.1-8B", _LLAMA_3_1_8B, ("llama-3.1-8b", "llama3.1-8b")),
    Preset("meta-llama/Llama-3.1-8B-Instruct",
           {**_LLAMA_3_1_8B, "eos_token_id": [128001, 128008, 128009]},
           ("llama-3.1-8b-instruct",)),
    Preset("meta-llama/Llama-3.1-70B", {
        **_LLAMA_3_1_8B, "hidden_size": 8192, "intermediate_size": 28672,
        "num_attention_heads": 64, "num_hidden_layers": 80,
    }, ("llama-3.1-70b", "llama3.1-70b")),
    Preset("meta-llama/Llama-3.2-1B", {
        **_LLAMA_3_1_8B, "head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "tie_word_embeddings": True,
        "rope_scaling": {**_LLAMA3_ROPE_8K, "factor": 32.0},
    }, ("llama-3.2-1b",)),
    Preset("mistralai/Mistral-7B-v0.1", _MISTRAL_7B_V01, ("mistral-7b-v0.1",)),
    # The alias points at v0.3: same shapes, but no sliding window (full attention).
    Preset("mistralai/Mistral-7B-Instruct-v0.3", {
        **_MISTRAL_7B_V01, "attention_dropout": 0.0, "rope_theta": 1000000.0,
        "sliding_window": None, "vocab_size": 32768,
    }, ("mistral-7b", "mistral-7b-instruct-v0.3")),
    Preset("Qwen/Qwen2.5-7B", {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
        "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
        "initializer_range": 0.02, "max_position_embeddings": 131072,
        "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 131072, "use_sliding_window": False,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 152064,
    }, ("qwen2.5-7b",)),
    Preset("HuggingFaceTB/SmolLM2-135M-Instruct", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
        "initializer_range": 0.041666666666666664, "max_position_embeddings": 8192,
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-05, "rope_theta": 100000, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "vocab_size": 49152,
    }, ("smollm2-135m", "smollm2-135m-instruct")),
    # For tests: tiny, but with the embedded SmolLM2 tokenizer's vocabulary and special ids,
    # so generated ids decode to real text.
    Preset("asgl/tiny-llama", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 2048,
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "float32", "vocab_size": 49152,
    }, ("tiny-llama",)),
]

_BY_NAME: dict[str, Preset] = {}
for _preset in _PRESETS:
    for _key in (_preset.name, _preset.name.split("/")[-1], *_preset.aliases):
        _BY_NAME.setdefault(_key.lower(), _preset)


def get_preset(name: str) -> Preset | None:
    """The preset called `name` (HF id, its last part, or an alias; any case), or None."""
    return _BY_NAME.get(name.strip().lower())


def preset_names() -> list[str]:
    """Every preset's HF id, for error messages and `--help`."""
    return [p.name for p in _PRESETS]
