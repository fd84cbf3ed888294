"""The one definition of every engine and server option.

`EngineConfig` is a msgspec Struct: build it from Python (`EngineConfig(model_path=...)`)
or from the command line (`EngineConfig.from_cli(argv)`). Flag names follow SGLang's
(`--model-path`, `--mem-fraction-static`, ...), so its users' command lines work here.
Each field's help text lives in `_HELP`; the CLI is generated from the fields, so a new
option is added in one place.
"""

from __future__ import annotations

import argparse
from typing import Any, Iterable, Literal, Optional

import msgspec


class ConfigError(ValueError):
    """An option has a value that cannot work; the message names the option."""


class EngineConfig(msgspec.Struct, kw_only=True):
    # --- model ---
    model_path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    load_format: Literal["auto", "safetensors", "pt", "gguf", "dummy"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "auto"
    quantization: Optional[str] = None
    torchao_config: Optional[str] = None
    context_length: Optional[int] = None
    trust_remote_code: bool = False
    chat_template: Optional[str] = None
    served_model_name: Optional[str] = None
    skip_tokenizer_init: bool = False
    is_embedding: bool = False
    revision: Optional[str] = None
    model_impl: Literal["auto", "native", "sglang", "transformers"] = "auto"
    gguf_file: Optional[str] = None

    # --- device and memory ---
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mem_fraction_static: Optional[float] = None
    cpu_kv_budget_gb: float = 2.0
    max_running_requests: Optional[int] = None
    max_total_tokens: Optional[int] = None
    max_queued_requests: Optional[int] = None
    chunked_prefill_size: Optional[int] = None
    max_prefill_tokens: int = 16384
    schedule_policy: Literal["lpm", "dfs-weight", "fcfs", "lof", "random"] = "lpm"
    schedule_conservativeness: float = 1.0
    disable_radix_cache: bool = False
    disable_overlap_schedule: bool = False
    random_seed: Optional[int] = None
    debug_check_integrity: bool = False

    # --- kernels ---
    attention_backend: Optional[Literal["torch", "triton", "flashinfer"]] = None
    sampling_backend: Optional[Literal["pytorch", "flashinfer"]] = None
    grammar_backend: Literal["xgrammar", "none"] = "xgrammar"
    disable_jump_forward: bool = False
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: Optional[int] = None
    cuda_graph_max_tokens: Optional[int] = None
    enable_torch_compile: bool = False
    torch_compile_max_bs: Optional[int] = None

    # --- parallelism ---
    tp_size: int = 1
    dp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: Optional[str] = None
    enable_p2p_check: bool = False

    # --- server ---
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: Optional[str] = None
    admin_api_key: Optional[str] = None
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_requests: bool = False
    max_request_body_mb: float = 32.0
    tool_call_parser: Optional[str] = None
    reasoning_parser: Optional[str] = None
    metrics_prefix: Literal["asgl", "sglang", "vllm"] = "asgl"
    shutdown_timeout: float = 30.0
    # a streamed choice's chunks are delivered every `stream_interval` tokens (its first
    # token and its end at once); native /generate streams deltas, not the output so far
    stream_interval: int = 1
    incremental_streaming_output: bool = False
    file_storage_path: Optional[str] = None
    max_batch_in_flight: Optional[int] = None

    # --- request limits (each refused with a 400 naming the flag, before anything is queued) ---
    max_prompt_chars: Optional[int] = None
    max_stop_strings: int = 32
    max_stop_string_chars: int = 256
    max_schema_depth: int = 64
    max_schema_bytes: int = 256 * 1024
    max_regex_chars: int = 64 * 1024
    max_tools: int = 128
    # per-request work budgets (asgl/server/limits.py check_work); None: by device
    max_request_tokens: Optional[int] = None
    max_prompt_logprobs: Optional[int] = None
    # images (vision-language models; asgl/server/images.py, asgl/engine/loop/mm_inputs.py)
    max_images_per_request: int = 16
    max_image_pixels: int = 40_000_000
    max_image_bytes_mb: float = 20.0
    enable_image_url_fetch: bool = False
    image_fetch_timeout: float = 10.0
    allowed_local_media_path: Optional[str] = None

    # --- liveness (asgl/engine/loop/watchdog.py) ---
    watchdog_timeout: float = 300.0
    exit_on_stall: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values that cannot work, naming the option."""
        positive = ("context_length", "max_running_requests", "max_total_tokens",
                    "max_queued_requests", "cuda_graph_max_bs", "torch_compile_max_bs",
                    "max_images_per_request", "max_image_pixels", "max_image_bytes_mb",
                    "image_fetch_timeout", "max_batch_in_flight")
        if self.cuda_graph_max_tokens is not None and self.cuda_graph_max_tokens < 0:
            raise ConfigError("--cuda-graph-max-tokens must be >= 0 (0: decode graphs only)")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{_flag(name)} must be positive, got {value}")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size <= 0 \
                and self.chunked_prefill_size != -1:
            raise ConfigError("--chunked-prefill-size must be positive (or -1 to disable)")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ConfigError(f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}")
        if self.watchdog_timeout < 0:
            raise ConfigError("--watchdog-timeout must be >= 0 (0: off), "
                              f"got {self.watchdog_timeout}")
        if self.shutdown_timeout < 0:
            raise ConfigError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout}")
        if self.stream_interval < 1:
            raise ConfigError(f"--stream-interval must be >= 1, got {self.stream_interval}")
        if self.cpu_kv_budget_gb <= 0:
            raise ConfigError("--cpu-kv-budget-gb must be positive")
        for name in ("tp_size", "dp_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be in [0, {self.nnodes})")
        self._validate_parallelism()
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must be in [0, 65535], got {self.port}")
        self._validate_request_limits()

    def _validate_request_limits(self) -> None:
        # The engine checks every request against fixed ceilings of its own (what stays safe
        # and fast whoever calls it); a server limit above its ceiling would be refused there.
        for name, ceiling in _LIMIT_CEILINGS.items():
            value = getattr(self, name)
            if value is not None and not 1 <= value <= (ceiling or value):
                bound = f"in [1, {ceiling}]" if ceiling else ">= 1"
                raise ConfigError(f"--{_flag(name)} must be {bound}, got {value}")

    def _validate_parallelism(self) -> None:
        if self.tp_size % self.nnodes:
            raise ConfigError(f"--tp {self.tp_size} must be a multiple of --nnodes "
                              f"{self.nnodes} (each node runs tp/nnodes ranks)")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ConfigError("--nnodes > 1 needs --dist-init-addr host:port (node 0's address)")
        if self.dist_init_addr and ":" not in self.dist_init_addr:
            raise ConfigError(f"--dist-init-addr must be host:port, got {self.dist_init_addr!r}")
        if self.dp_size > 1 and self.nnodes > 1:
            raise ConfigError("--dp > 1 runs its replicas on one node: drop --nnodes")
        if self.is_embedding and self.tp_size > 1:
            raise ConfigError("--is-embedding runs on one rank: drop --tp")

    # ------------------------------------------------------------------ CLI
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser,
                     groups: Optional[Iterable[str]] = None) -> None:
        """Add a flag per field, in `--help` sections (`CLI_GROUPS`); `groups` limits them to
        those sections (a subcommand shows only flags it uses). Each default is printed once:
        after the help text, unless the text already says what the default is."""
        defaults = cls()
        wanted = set(groups) if groups is not None else None
        sections: dict[str, argparse._ArgumentGroup] = {}
        fields = sorted(msgspec.structs.fields(cls),  # stable: field order within a section
                        key=lambda f: GROUP_ORDER.index(_group_of(f.name)))
        for field in fields:
            name = field.name
            group = _group_of(name)
            if wanted is not None and group not in wanted:
                continue
            if group not in sections:
                sections[group] = parser.add_argument_group(f"{group} options")
            section = sections[group]
            flags = [f"--{_flag(name)}"] + _ALIASES.get(name, [])
            default = getattr(defaults, name)
            help_text = _HELP.get(name, "")
            annotation = field.type
            if annotation is bool:
                section.add_argument(*flags, dest=name, action="store_true", help=help_text)
                continue
            choices = _literal_choices(annotation)
            kind = _scalar_type(annotation)
            if default is not None and "default" not in help_text:
                help_text = f"{help_text} (default: {default})".strip()
            section.add_argument(*flags, dest=name, type=kind, choices=choices, default=default,
                                 help=help_text)

    @classmethod
    def from_cli(cls, argv: list[str] | None = None, prog: str = "asgl serve") -> "EngineConfig":
        parser = argparse.ArgumentParser(prog=prog)
        cls.add_cli_args(parser)
        return cls.from_namespace(parser.parse_args(argv))

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "EngineConfig":
        names = {f.name for f in msgspec.structs.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})

    def replace(self, **changes: Any) -> "EngineConfig":
        return msgspec.structs.replace(self, **changes)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _literal_choices(annotation: Any) -> list | None:
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) is Literal:
        return list(args)
    if args:  # Optional[Literal[...]]
        for arg in args:
            if getattr(arg, "__origin__", None) is Literal:
                return list(arg.__args__)
    return None


def _scalar_type(annotation: Any) -> type:
    choices = _literal_choices(annotation)
    if choices:
        return type(choices[0])
    args = getattr(annotation, "__args__", None) or (annotation,)
    for arg in args:
        if arg in (int, float, str):
            return arg
    return str


# Ceilings the engine itself enforces on every request, whoever calls it (SamplingParams.validate,
# asgl/engine/grammar/specs.py): what stays safe (no recursion overflow, bounded stop-string
# state) however a server limit is set. A server limit may not exceed its ceiling.
STOP_STRINGS_CEILING = 64
STOP_STRING_CHARS_CEILING = 1024
SCHEMA_DEPTH_CEILING = 128  # nesting levels: recursive checks and xgrammar stay well inside
SPEC_CHARS_CEILING = 1 << 20  # a JSON schema, EBNF grammar or structural tag, as text
REGEX_CHARS_CEILING = 128 * 1024

_LIMIT_CEILINGS: dict[str, Optional[int]] = {
    "max_prompt_chars": None,
    "max_stop_strings": STOP_STRINGS_CEILING,
    "max_stop_string_chars": STOP_STRING_CHARS_CEILING,
    "max_schema_depth": SCHEMA_DEPTH_CEILING,
    "max_schema_bytes": SPEC_CHARS_CEILING,
    "max_regex_chars": REGEX_CHARS_CEILING,
    "max_tools": None,
    "max_request_tokens": None,
    "max_prompt_logprobs": None,
}

# `asgl serve --help` sections, as SGLang's and vLLM's: a field's section, by name. A field
# missing here is listed under "other" (so a new flag needs no edit here to show up).
GROUP_ORDER = ["model", "serving", "API", "request limits", "scheduling", "memory",
                "parallelism", "kernels", "logging", "other"]
CLI_GROUPS: dict[str, str] = {
    **dict.fromkeys(["model_path", "tokenizer_path", "load_format", "dtype", "quantization",
                     "context_length", "trust_remote_code", "chat_template", "revision",
                     "skip_tokenizer_init", "is_embedding", "device", "model_impl", "gguf_file"], "model"),
    "torchao_config": "model",
    **dict.fromkeys(["host", "port", "api_key", "admin_api_key", "max_request_body_mb",
                     "max_queued_requests", "shutdown_timeout", "watchdog_timeout",
                     "exit_on_stall", "file_storage_path", "max_batch_in_flight"], "serving"),
    **dict.fromkeys(["served_model_name", "tool_call_parser", "reasoning_parser",
                     "metrics_prefix", "stream_interval", "incremental_streaming_output"],
                    "API"),
    **dict.fromkeys(["max_prompt_chars", "max_stop_strings", "max_stop_string_chars",
                     "max_schema_depth", "max_schema_bytes", "max_regex_chars", "max_tools",
                     "max_request_tokens", "max_prompt_logprobs", "max_images_per_request",
                     "max_image_pixels", "max_image_bytes_mb", "enable_image_url_fetch",
                     "image_fetch_timeout", "allowed_local_media_path"],
                    "request limits"),
    **dict.fromkeys(["max_running_requests", "chunked_prefill_size", "max_prefill_tokens",
                     "schedule_policy", "schedule_conservativeness", "disable_radix_cache",
                     "disable_overlap_schedule", "random_seed"], "scheduling"),
    **dict.fromkeys(["mem_fraction_static", "cpu_kv_budget_gb", "max_total_tokens",
                     "kv_cache_dtype"], "memory"),
    **dict.fromkeys(["tp_size", "dp_size", "nnodes", "node_rank", "dist_init_addr",
                     "enable_p2p_check"], "parallelism"),
    **dict.fromkeys(["attention_backend", "sampling_backend", "grammar_backend",
                     "disable_jump_forward", "disable_cuda_graph", "cuda_graph_max_bs",
                     "cuda_graph_max_tokens", "enable_torch_compile", "torch_compile_max_bs"],
                    "kernels"),
    **dict.fromkeys(["log_level", "log_requests", "debug_check_integrity"], "logging"),
}
# What only a server uses: `asgl generate` leaves these sections out.
SERVER_ONLY_GROUPS = ("serving", "API", "request limits")


def _group_of(name: str) -> str:
    return CLI_GROUPS.get(name, "other")


_ALIASES: dict[str, list[str]] = {
    "model_path": ["--model"],
    "tp_size": ["--tp", "--tensor-parallel-size"],
    "dp_size": ["--dp", "--data-parallel-size"],
    "dist_init_addr": ["--nccl-init-addr", "--nccl-init"],
}

_HELP: dict[str, str] = {
    "max_images_per_request": "most images one request may carry",
    "max_image_pixels": "most pixels (width x height) of one image, checked before decoding",
    "max_image_bytes_mb": "largest encoded image (data URL, file or download) in MB",
    "enable_image_url_fetch": "fetch http(s) image URLs in requests (size and time limits; "
                              "private and loopback addresses refused); off: such URLs are a 400",
    "image_fetch_timeout": "seconds one image download may take",
    "allowed_local_media_path": "a directory whose files requests may name as images "
                                "(file:// URLs or paths); default: none",
    "model_path": "HF model directory, a .gguf file, a hub id ORG/NAME[:QUANT] (downloaded), "
                  "or a preset name with --load-format dummy; "
                  "default: the embedded SmolLM2-135M-Instruct",
    "tokenizer_path": "tokenizer directory (default: the model's)",
    "revision": "branch, tag or commit of a hub --model-path (ORG/NAME)",
    "gguf_file": "the .gguf file of a hub repo (or of a local directory) to serve",
    "file_storage_path": "directory of /v1/files and /v1/batches (default: the user's cache "
                         "dir, asgl/files)",
    "max_batch_in_flight": "most /v1/batches lines in the engine at once, beside online "
                           "requests (default: 2 on the CPU, 32 on a GPU)",
    "load_format": "how to read weights; 'dummy' makes random weights for a preset config",
    "dtype": "weight and activation dtype; auto = bfloat16 on CUDA, float32 on the CPU",
    "kv_cache_dtype": "KV cache dtype; auto = the model dtype; fp8_e4m3 / fp8_e5m2 halve a "
                      "16-bit cache (scales from the checkpoint, else 1.0)",
    "quantization": "weight quantization: fp8 (quantize a 16-bit checkpoint on load), or the "
                    "checkpoint's own (fp8, modelopt, fbgemm_fp8, compressed-tensors; read "
                    "from its config without the flag); see docs/quantization.md",
    "torchao_config": "quantize linear layers with torchao: int4wo-<group>, int8wo, int8dq, "
                      "fp8wo, fp8dq",
    "context_length": "maximum tokens of prompt + output (default: the model's)",
    "trust_remote_code": "allow code from the model directory to run",
    "model_impl": "auto: asgl's own model file, else transformers' modelling code with asgl "
                  "attention (logged); native (or SGLang's name, sglang): asgl's only; "
                  "transformers: always transformers'",
    "chat_template": "a built-in template name or a Jinja file for chat requests",
    "served_model_name": "model name reported by the OpenAI API",
    "skip_tokenizer_init": "take and return token ids only",
    "is_embedding": "serve an embedding model (prefill only)",
    "device": "cpu, cuda, or auto (cuda when available)",
    "mem_fraction_static": "fraction of GPU memory for weights + KV pool (default 0.88)",
    "cpu_kv_budget_gb": "KV pool size on the CPU, in GiB",
    "max_running_requests": "most requests decoding at once",
    "max_total_tokens": "KV pool capacity in tokens (overrides the memory-based size)",
    "max_queued_requests": "most requests waiting; more get HTTP 503",
    "chunked_prefill_size": "most prompt tokens per step; longer prompts are split (-1: off)",
    "max_prefill_tokens": "most prompt tokens admitted in one step",
    "schedule_policy": "order of waiting requests",
    "disable_radix_cache": "turn off prefix caching",
    "disable_overlap_schedule": "prepare each step only after the previous one finished",
    "random_seed": "seed for requests that give none",
    "debug_check_integrity": "check KV memory ownership after every step (slow; for tests)",
    "attention_backend": "attention kernels (default: flashinfer on CUDA, torch on the CPU)",
    "sampling_backend": "pytorch (default: batch-invariant seeded draws) or flashinfer (CUDA: "
                        "no sort; batches with a seeded request still use pytorch)",
    "enable_torch_compile": "run the model through torch.compile (inductor) for small batches "
                            "(inside the CUDA graphs on CUDA)",
    "torch_compile_max_bs": "most tokens of a step that runs compiled (default 32)",
    "grammar_backend": "constrained decoding backend",
    "disable_cuda_graph": "run every step eagerly (no CUDA graphs)",
    "cuda_graph_max_bs": "largest decode batch replayed from a CUDA graph (default: the most "
                         "running requests, at most 1024)",
    "cuda_graph_max_tokens": "most new tokens of a prefill / mixed step replayed from a CUDA "
                             "graph (default 1024; 0: decode graphs only)",
    "tp_size": "tensor parallel size",
    "dp_size": "data parallel replicas",
    "dist_init_addr": "host:port of rank 0 for multi-node runs",
    "nnodes": "nodes the tensor-parallel ranks span (node k runs ranks k*tp/nnodes..)",
    "node_rank": "this node's index; a node other than 0 runs its ranks and no server",
    "enable_p2p_check": "check GPU peer-to-peer access first; NCCL avoids P2P where missing",
    "host": "address to listen on",
    "port": "port to listen on",
    "api_key": "require 'Authorization: Bearer KEY' on every route but /health",
    "admin_api_key": "require 'Authorization: Bearer KEY' with this key on the admin routes "
                     "(/flush_cache, /abort_request, ...); --api-key no longer opens them",
    "log_level": "logging level",
    "max_request_body_mb": "largest accepted request body",
    "tool_call_parser": "tool-call format of the model (hermes, llama3, mistral, qwen3_coder, "
                        "deepseekv3, deepseekv31, pythonic, gpt-oss, kimi_k2, glm45)",
    "reasoning_parser": "split reasoning from content in chat answers (deepseek-r1, qwen3, "
                        "qwen3-thinking, gpt-oss, kimi, glm45): reasoning_content",
    "metrics_prefix": "metric names and labels of /metrics as SGLang's (sglang:) or vLLM's "
                      "(vllm:) dashboards query them",
    "shutdown_timeout": "seconds in-flight requests may run on after SIGTERM/SIGINT; then "
                        "they end with finish_reason abort",
    "stream_interval": "streamed tokens per event: a choice's chunks are held until this "
                       "many tokens are new (its first token and its end go at once); higher "
                       "costs the server less per token",
    "incremental_streaming_output": "native /generate streams: each event holds the new "
                                    "text and output_ids only, not the output so far",
    "max_prompt_chars": "most characters of a text prompt (or of a chat's messages), refused "
                        "before tokenizing (default: 16 x the context length)",
    "max_stop_strings": "most stop strings per request (at most 64)",
    "max_stop_string_chars": "most characters of one stop string (at most 1024)",
    "max_schema_depth": "most nesting levels of a JSON schema (response_format, json_schema, "
                        "tool parameters; at most 128)",
    "max_schema_bytes": "most bytes of a JSON schema, EBNF grammar or structural tag, and of "
                        "a request's tool schemas in all (at most 1 MiB)",
    "max_regex_chars": "most characters of a regex constraint (at most 128 KiB)",
    "max_tools": "most tools in a chat request",
    "max_request_tokens": "most tokens a request of several sequences may generate in all: "
                          "n x max_tokens summed over its prompts, an absent max_tokens "
                          "counting as the context left (default 4096 on the CPU, 262144 on "
                          "a GPU); one sequence is bounded by the context alone",
    "max_prompt_logprobs": "most prompt positions a request may get logprobs for (echo, "
                           "logprob_start_len), summed over its prompts and n (default 1024 "
                           "on the CPU, 65536 on a GPU)",
    "watchdog_timeout": "seconds the scheduler or the worker may go without progress while "
                        "work is queued; then /health is 503 and every thread's stack is "
                        "logged (0: off)",
    "exit_on_stall": "exit the process (status 70) when the watchdog fires, for a supervisor "
                     "to restart it",
}
