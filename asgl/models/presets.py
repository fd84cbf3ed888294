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
        if fields["model_type"] in CONFIG_MAPPING:
            config = CONFIG_MAPPING[fields["model_type"]].from_dict(fields)
        else:  # a family whose config class ships as remote code: read as the loader does
            config = PretrainedConfig(**{k: v for k, v in fields.items() if k != "model_type"})
        # a model_type transformers lacks (Grok-1, DeepSeek V1: remote code) -> plain config
        model_type = fields["model_type"]
        cls = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else PretrainedConfig
        config = cls.from_dict(fields)
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

_GEMMA_2_9B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
    "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": 50.0,
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "final_logit_softcapping": 30.0,
    "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 8192, "num_attention_heads": 16, "num_hidden_layers": 42,
    "num_key_value_heads": 8, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
    "use_cache": True, "vocab_size": 256000,
}

_GEMMA_7B = {
    "architectures": ["GemmaForCausalLM"], "model_type": "gemma",
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 1,
    "pad_token_id": 0, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 24576, "max_position_embeddings": 8192,
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 16,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    "vocab_size": 256000,
}

_QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "max_window_layers": 36, "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}

_DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 100000,
    "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy",
    "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400,
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
    Preset("internlm/internlm2-7b", {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "initializer_range": 0.02,
        "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 92544,
    }, ("internlm2-7b",)),
    Preset("THUDM/chatglm3-6b", {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "add_bias_linear": False,
        "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_softmax_in_fp32": True,
        "ffn_hidden_size": 13696, "hidden_size": 4096, "kv_channels": 128,
        "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": 2,
        "num_attention_heads": 32, "num_layers": 28, "original_rope": True,
        "padded_vocab_size": 65024, "post_layer_norm": True, "rmsnorm": True,
        "seq_length": 8192, "tie_word_embeddings": False, "torch_dtype": "float16",
        "eos_token_id": 2, "pad_token_id": 0,
    }, ("chatglm3-6b",)),
    Preset("HuggingFaceTB/SmolLM2-135M-Instruct", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
        "initializer_range": 0.041666666666666664, "max_position_embeddings": 8192,
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-05, "rope_theta": 100000, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "vocab_size": 49152,
    }, ("smollm2-135m", "smollm2-135m-instruct")),
    Preset("google/gemma-2-9b", _GEMMA_2_9B, ("gemma-2-9b",)),
    Preset("google/gemma-2-9b-it", {**_GEMMA_2_9B, "eos_token_id": [1, 107]},
           ("gemma-2-9b-it",)),
    Preset("google/gemma-2-2b", {
        **_GEMMA_2_9B, "hidden_size": 2304, "intermediate_size": 9216,
        "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
    }, ("gemma-2-2b",)),
    Preset("google/gemma-7b", _GEMMA_7B, ("gemma-7b",)),
    Preset("google/gemma-2b", {
        **_GEMMA_7B, "hidden_size": 2048, "intermediate_size": 16384, "num_attention_heads": 8,
        "num_hidden_layers": 18, "num_key_value_heads": 1,
    }, ("gemma-2b",)),
    Preset("google/gemma-3-270m", {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "final_logit_softcapping": None, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
        "initializer_range": 0.02, "intermediate_size": 2048,
        "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 18,
        "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": 512, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "vocab_size": 262144,
    }, ("gemma-3-270m",)),
    Preset("Qwen/Qwen3-8B", _QWEN3_8B, ("qwen3-8b",)),
    Preset("Qwen/Qwen3-0.6B", {
        **_QWEN3_8B, "hidden_size": 1024, "intermediate_size": 3072, "max_window_layers": 28,
        "num_attention_heads": 16, "num_hidden_layers": 28, "tie_word_embeddings": True,
    }, ("qwen3-0.6b",)),
    Preset("microsoft/Phi-3-mini-4k-instruct", {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "embd_pdrop": 0.0, "eos_token_id": [32000, 32001, 32007], "hidden_act": "silu",
        "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
        "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32064,
    }, ("phi-3-mini", "phi-3-mini-4k-instruct")),
    Preset("allenai/OLMo-2-1124-7B", {
        "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2",
        "attention_bias": False, "attention_dropout": 0.0, "eos_token_id": 100257,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008, "max_position_embeddings": 4096,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 500000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "vocab_size": 100352,
    }, ("olmo-2-7b", "olmo-2-1124-7b")),
    Preset("ibm-granite/granite-3.1-8b-instruct", {
        "architectures": ["GraniteForCausalLM"], "model_type": "granite",
        "attention_bias": False, "attention_dropout": 0.1, "attention_multiplier": 0.0078125,
        "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 12800, "logits_scaling": 16.0, "max_position_embeddings": 131072,
        "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 40,
        "num_key_value_heads": 8, "pad_token_id": 0, "residual_multiplier": 0.22,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000000.0,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 49155,
    }, ("granite-3.1-8b", "granite-3.1-8b-instruct")),
    Preset("stabilityai/stablelm-2-1_6b", {
        "architectures": ["StableLmForCausalLM"], "model_type": "stablelm",
        "bos_token_id": 100257, "eos_token_id": 100257, "hidden_act": "silu",
        "hidden_dropout": 0.0, "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 5632, "layer_norm_eps": 1e-05, "max_position_embeddings": 4096,
        "num_attention_heads": 32, "num_hidden_layers": 24, "num_key_value_heads": 32,
        "partial_rotary_factor": 0.25, "qk_layernorm": False, "rope_scaling": None,
        "rope_theta": 10000, "tie_word_embeddings": False, "torch_dtype": "float16",
        "use_parallel_residual": False, "use_qkv_bias": True, "vocab_size": 100352,
    }, ("stablelm-2-1.6b", "stablelm-2-1_6b")),
    Preset("CohereForAI/c4ai-command-r-v01", {
        "architectures": ["CohereForCausalLM"], "model_type": "cohere",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 5,
        "eos_token_id": 255001, "hidden_act": "silu", "hidden_size": 8192,
        "initializer_range": 0.02, "intermediate_size": 22528, "layer_norm_eps": 1e-05,
        "logit_scale": 0.0625, "max_position_embeddings": 8192, "num_attention_heads": 64,
        "num_hidden_layers": 40, "num_key_value_heads": 64, "pad_token_id": 0,
        "rope_theta": 8000000.0, "tie_word_embeddings": True, "torch_dtype": "float16",
        "use_qk_norm": False, "vocab_size": 256000,
    }, ("command-r", "c4ai-command-r-v01")),
    Preset("mistralai/Mixtral-8x7B-v0.1", {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "num_attention_heads": 32, "num_experts_per_tok": 2,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
    }, ("mixtral-8x7b", "mixtral-8x7b-v0.1")),
    Preset("Qwen/Qwen3-30B-A3B", {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
        "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
        "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    }, ("qwen3-30b-a3b",)),
    # MLA (latent KV: 512 + 64 values per token per layer) + MoE (64 routed experts, top-6,
    # 2 shared; layer 0 dense): 15.7B parameters, 2.4B active per token
    Preset("deepseek-ai/DeepSeek-V2-Lite", _DEEPSEEK_V2_LITE, ("deepseek-v2-lite",)),
    Preset("deepseek-ai/DeepSeek-V2-Lite-Chat", _DEEPSEEK_V2_LITE, ("deepseek-v2-lite-chat",)),
    # 671B (without the multi-token-prediction layer, which is not served): shapes only
    Preset("deepseek-ai/DeepSeek-V3", {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
        "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
        "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
        "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
        "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                         "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
    }, ("deepseek-v3",)),
    Preset("hpcai-tech/grok-1", {
        "architectures": ["Grok1ModelForCausalLM"], "model_type": "grok-1",
        "attn_output_multiplier": 0.08838834764831845, "bos_token_id": 1,
        "embedding_multiplier_scale": 78.38367176906169, "eos_token_id": 2, "hidden_size": 6144,
        "intermediate_size": 32768, "max_attn_value": 30.0, "max_position_embeddings": 8192,
        "num_attention_heads": 48, "num_experts": 8, "num_experts_per_tok": 2,
        "num_hidden_layers": 64, "num_key_value_heads": 8,
        "output_multiplier_scale": 0.5773502691896257, "pad_token_id": 0, "rms_norm_eps": 1e-05,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 131072,
    }, ("grok-1",)),
    Preset("deepseek-ai/deepseek-moe-16b-base", {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
        "attention_bias": False, "bos_token_id": 100000, "eos_token_id": 100001,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 10944, "max_position_embeddings": 4096,
        "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_routed_experts": 64,
        "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
        "num_experts_per_tok": 6, "num_hidden_layers": 28, "num_key_value_heads": 16,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000,
        "scoring_func": "softmax", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "vocab_size": 102400,
    }, ("deepseek-moe-16b", "deepseek-moe-16b-base")),
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
