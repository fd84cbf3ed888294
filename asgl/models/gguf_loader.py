"""Convert a llama.cpp GGUF file into an HF-style model directory, once, in a cache.

`convert_gguf(path)` dequantizes every tensor to float32 under its HF name, builds the
transformers config from the GGUF metadata, converts the tokenizer (transformers reads the
GGUF vocabulary and merges) and writes all of it to
`$ASGL_CACHE_DIR/gguf/<key>/` (default `~/.cache/asgl/gguf/<key>/`), where the key hashes the
file's content (and the converter's version). Later starts read that directory like any HF
model directory, wherever the file now lies: another venv, or a new container whose cache
is on a volume. The content digest is remembered per (path, size, mtime) in
`gguf-digests/`, so a start on the same machine does not read the file to hash it again.

The directory is written under a temporary name and renamed into place, so a reader never
sees half of it; when two processes convert at once, the first rename wins and the other
process drops its copy and uses the winner's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

from asgl.engine.contracts.errors import ModelLoadError
from asgl.models import gguf_arch

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",) + gguf_arch.ARCHITECTURES  # the others: gguf_arch.py
# Bump when the conversion's output changes, so old cache entries are not reused.
CONVERTER_VERSION = 2  # 2: architectures beyond llama, end-of-turn eos ids
_SHARD_BYTES = 4 << 30

# llama.cpp tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    # Mixtral (llama with experts): each projection of all experts stacked, [E, I, H]
    "ffn_gate_inp": "block_sparse_moe.gate", "ffn_gate_exps": "block_sparse_moe.experts.w1",
    "ffn_up_exps": "block_sparse_moe.experts.w3", "ffn_down_exps": "block_sparse_moe.experts.w2",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def cache_root() -> Path:
    """Root of asgl's caches: $ASGL_CACHE_DIR, else ~/.cache/asgl."""
    return Path(os.environ.get("ASGL_CACHE_DIR") or Path.home() / ".cache" / "asgl")


def cache_dir_for(path: str) -> Path:
    """Where the conversion of the GGUF at `path` lives: keyed on its content, so a copy of
    the file at another path (a new venv or container) finds the same entry."""
    key = f"v{CONVERTER_VERSION}\0{file_digest(path)}"
    return cache_root() / "gguf" / hashlib.sha256(key.encode()).hexdigest()


def file_digest(path: str) -> str:
    """sha256 of the file's bytes, remembered under a key of its path, size and mtime (cheap
    to compute; a replaced file gets a new one), so only a new file is read to hash it."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stat_key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    memo = cache_root() / "gguf-digests" / stat_key
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    # a bar only where hashing takes seconds (about 1 GB/s)
    bar = tqdm(total=st.st_size, unit="B", unit_scale=True, disable=st.st_size < (1 << 30),
               desc=f"Hashing {os.path.basename(real)}")
    with open(real, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
            bar.update(len(chunk))
    bar.close()
    digest = h.hexdigest()
    try:  # written aside and renamed: a concurrent reader never sees half a digest
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:  # a read-only cache still works, it only hashes again next time
        pass
    return digest


def convert_gguf(path: str) -> str:
    """Return an HF-style directory holding the conversion of `path`, converting on a miss."""
    final = cache_dir_for(path)
    if final.is_dir():
        logger.info("using the conversion of %s cached in %s", os.path.basename(path), final)
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final.parent)
    logger.info("converting %s (once: later starts reuse %s)", path, final)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        _convert_into(path, tmp)
        published = _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", os.path.basename(path), time.perf_counter() - started)
    return str(published)


def _publish(tmp: Path, final: Path) -> Path:
    """Rename the finished `tmp` to `final`; if another process got there first, use theirs."""
    try:
        os.rename(tmp, final)  # atomic; fails if `final` exists and is not empty
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_temporaries(folder: Path, max_age_s: float = 24 * 3600) -> None:
    """Drop half-written conversions left by crashed processes (each can be gigabytes).
    Only old ones: a recent one may belong to a conversion still running."""
    now = time.time()
    for entry in folder.glob(".*.tmp"):
        try:
            if now - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------- conversion
def _convert_into(path: str, out: Path) -> None:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # truncated or not a GGUF: the reader fails in many ways
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
    meta = _Metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if meta.get(f"{arch}.expert_count", 0) and arch not in gguf_arch.MOE_ARCHITECTURES \
            and arch != "llama":  # llama with experts: Mixtral
        raise ModelLoadError(f"{path}: mixture-of-experts {arch} GGUFs are not supported")

    tensors = {t.name: t for t in reader.tensors}
    if arch == "llama":
        config = _llama_config(meta, arch, tensors)
    else:
        config = _arch_config(meta, arch, tensors)
    # One bar for the whole conversion: a step per tensor, one per file written and one
    # for the tokenizer (transformers rebuilds it from the GGUF vocabulary: seconds).
    named = sum(hf_tensor_name(name, arch) is not None for name in tensors)
    with tqdm(total=named + _shard_count(tensors, arch) + 1, unit="step",
              desc=f"Converting {os.path.basename(path)}") as bar:
        _save_weights(path, tensors, config, out, bar, arch)
        bar.set_postfix_str("tokenizer")
        _save_tokenizer(path, meta, out, arch)
        bar.update()
    config.save_pretrained(out)
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos += _end_of_turn_ids(reader)
    GenerationConfig(
        bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
        eos_token_id=list(dict.fromkeys(i for i in eos if i is not None)) or None,
    ).save_pretrained(out)
    with open(out / "asgl_source.json", "w", encoding="utf-8") as f:
        json.dump({"gguf": os.path.realpath(path), "converter_version": CONVERTER_VERSION}, f)


def _llama_config(meta: "_Metadata", arch: str, tensors: dict[str, Any]) -> LlamaConfig:
    hidden = meta.require(f"{arch}.embedding_length")
    heads = meta.require(f"{arch}.attention.head_count")
    vocab = meta.get(f"{arch}.vocab_size") or meta.array_len("tokenizer.ggml.tokens") \
        or int(tensors["token_embd.weight"].shape[-1])
    rope_theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    head_dim = meta.get(f"{arch}.attention.key_length") or hidden // heads
    fields = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": meta.require(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.require(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": meta.get(f"{arch}.context_length", 2048),
        # GGUF stores the epsilon as float32 (1e-5 reads 9.9999997e-06): round it back.
        "rms_norm_eps": float(f"{meta.get(f'{arch}.attention.layer_norm_rms_epsilon', 1e-5):.7g}"),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(meta, arch, tensors, rope_theta, head_dim),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if meta.get(f"{arch}.expert_count", 0):  # Mixtral
        from transformers import MixtralConfig

        fields.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                      num_local_experts=meta.get(f"{arch}.expert_count"),
                      num_experts_per_tok=meta.require(f"{arch}.expert_used_count"),
                      sliding_window=None)
        return MixtralConfig.from_dict(fields)
    return LlamaConfig.from_dict(fields)


def _arch_config(meta: "_Metadata", arch: str, tensors: dict[str, Any]) -> Any:
    """The transformers config of a non-llama GGUF (fields: gguf_arch.config_fields)."""
    from gguf.quants import dequantize
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    def read(t: Any) -> np.ndarray:
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).ravel()

    fields = gguf_arch.config_fields(meta, arch, tensors, read)
    return CONFIG_MAPPING[fields["model_type"]].from_dict(fields)


def _end_of_turn_ids(reader: Any) -> list[int]:
    """Ids of the chat end-of-turn tokens (gguf_arch.END_OF_TURN_TOKENS) in the vocabulary."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return []
    wanted = {t.encode() for t in gguf_arch.END_OF_TURN_TOKENS}
    lengths = {len(t) for t in wanted}
    found = []
    for i, idx in enumerate(field.data):
        part = field.parts[idx]
        if len(part) in lengths and bytes(part) in wanted:
            found.append(i)
    return found


def _rope_scaling(meta: "_Metadata", arch: str, tensors: dict[str, Any], theta: float,
                  head_dim: int) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in ("linear", "yarn") and factor:
        scaling = {"rope_type": kind, "factor": float(factor)}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if "rope_freqs.weight" in tensors:
        return _llama3_scaling_from_freqs(tensors["rope_freqs.weight"], theta, head_dim)
    return None


def _llama3_scaling_from_freqs(tensor: Any, theta: float, head_dim: int) -> dict:
    """llama.cpp stores Llama 3.1-style RoPE scaling as per-frequency divisors (rope_freqs).
    Recover the HF parameters: assume the published low/high factors and original context,
    take the factor from the largest divisor, and check they reproduce every divisor."""
    from gguf.quants import dequantize

    stored = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).ravel()
    scaling = {"rope_type": "llama3", "factor": float(stored.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if not np.allclose(stored, _llama3_divisors(scaling, theta, head_dim), rtol=1e-4):
        raise ModelLoadError("rope_freqs in this GGUF match no known Llama 3 RoPE scaling")
    return scaling


def _llama3_divisors(s: dict, theta: float, head_dim: int) -> np.ndarray:
    """The divisor llama3 RoPE scaling applies to each rotary frequency."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    old = s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    smooth = (old / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / s["factor"] + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, s["factor"], mid))


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF parameter name of a llama.cpp tensor; None for tensors HF has no parameter for."""
    if arch != "llama":
        try:
            return gguf_arch.hf_tensor_name(arch, gguf_name)
        except KeyError:
            raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no known HF name for a "
                                 f"{arch} model") from None
    if gguf_name == "rope_freqs.weight":
        return None  # folded into config.rope_scaling
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix == "weight":
        return f"{_GLOBAL_NAMES[base]}.weight"
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, suffix = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no known HF name for a Llama model")


def _unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: it interleaves each head's two rotary halves
    (rows 0, d/2, 1, d/2+1, ...) for its own RoPE kernel; HF keeps the halves apart."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _shard_count(tensors: dict[str, Any], arch: str = "llama") -> int:
    return len(_plan_shards([(hf, t) for t in tensors.values()
                             if (hf := hf_tensor_name(t.name, arch)) is not None]))


def _plan_shards(named: list[tuple[str, Any]]) -> list[list[tuple[str, Any]]]:
    shards: list[list[tuple[str, Any]]] = [[]]
    shard_bytes = 0
    for hf, t in named:  # plan shards from element counts, before dequantizing anything
        nbytes = int(t.n_elements) * 4
        if shards[-1] and shard_bytes + nbytes > _SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((hf, t))
        shard_bytes += nbytes
    return shards


def _save_weights(path: str, tensors: dict[str, Any], config: LlamaConfig, out: Path,
                  bar: Any, arch: str = "llama") -> None:
    from gguf.quants import dequantize

    named = [(hf, t) for t in tensors.values()
             if (hf := hf_tensor_name(t.name, arch)) is not None]
    shards = _plan_shards(named)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else \
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        state: dict[str, torch.Tensor] = {}
        for hf, t in shard:
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost-first
            # np.array copies: the reader hands out read-only views of the memory-mapped file.
            w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
            w = w.reshape(shape)
            if arch != "llama":  # only llama's q/k rows were permuted
                w = gguf_arch.fix_tensor(arch, hf, w)
            elif hf.endswith("q_proj.weight"):
                w = _unpermute_rows(w, config.num_attention_heads)
            elif hf.endswith("k_proj.weight"):
                w = _unpermute_rows(w, config.num_key_value_heads)
            state[hf] = w.contiguous()
            weight_map[hf] = file
            bar.update()
        bar.set_postfix_str(f"writing {file}")
        save_file(state, str(out / file), metadata={"format": "pt"})
        bar.update()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(int(t.n_elements) * 4 for _, t in named)},
                 "weight_map": weight_map}
        with open(out / "model.safetensors.index.json", "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)


def _save_tokenizer(path: str, meta: "_Metadata", out: Path, arch: str = "llama") -> None:
    folder, name = os.path.split(os.path.abspath(path))
    try:
        # transformers converts the GGUF vocabulary and merges into a fast tokenizer.
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot convert the GGUF tokenizer: {exc}") from exc
    template = meta.get("tokenizer.chat_template") or gguf_arch.default_chat_template(arch)
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))


class _Metadata:
    """Scalar GGUF metadata by key (strings decoded, numbers as Python numbers)."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        from gguf import GGUFValueType

        field = self._fields.get(key)
        if field is None or not field.data:
            return default
        if field.types[0] == GGUFValueType.ARRAY:
            return default
        part = field.parts[field.data[0]]
        if field.types[0] == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part[0].item()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks {key!r}")
        return value

    def array_len(self, key: str) -> int | None:
        field = self._fields.get(key)
        return len(field.data) if field is not None else None
