"""Embedding engines in-process: all-MiniLM-L6-v2 (BERT) against sentence-transformers,
tiny random Mistral and Qwen2 embedders (last-token pooling) against HF transformers'
hidden states, pooling configs, truncation and Matryoshka dimensions, bad input."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers

from asgl.engine.loop.embedder import PoolingConfig
from asgl.engine.worker.encode import pool
from asgl.engine.loop.engine import Engine
from asgl.engine.contracts.errors import InvalidRequest
from asgl.models.loader import ModelLoadError, embedded_embedding_model_path
from asgl.models.registry import get_model_class
from helpers import rel_err

aio = pytest.mark.asyncio(loop_scope="module")  # the engines live on the module's loop

TEXTS = ["How are you today", "The quick brown fox jumps over the lazy dog.",
         "Embeddings map text to vectors; similar texts get nearby vectors.", "a"]
TINY = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, initializer_range=0.1)
SEQS = [[5, 7, 9, 11, 3, 2, 8, 1], [4, 4, 4], list(range(1, 40)), [17]]


def cosine_distance(a, b) -> torch.Tensor:
    return 1 - F.cosine_similarity(torch.as_tensor(a, dtype=torch.float64),
                                   torch.as_tensor(b, dtype=torch.float64), dim=-1)


@pytest.fixture(scope="module")
def st_vectors():
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(embedded_embedding_model_path(), device="cpu")
    return st.encode(TEXTS, convert_to_tensor=True)


@pytest.fixture(scope="module")
async def minilm():
    engine = Engine(is_embedding=True)  # no model: the embedded all-MiniLM-L6-v2
    await engine.start()
    yield engine
    await engine.shutdown()


# --------------------------------------------------------------------------- BERT
@aio
async def test_minilm_matches_sentence_transformers(minilm, st_vectors):
    assert minilm.context_len == 256  # sentence_bert_config.json's max_seq_length
    single = await minilm.embed(TEXTS[0])
    assert single.index == 0 and single.prompt_tokens == 6 and len(single.embedding) == 384
    assert cosine_distance(single.embedding, st_vectors[0]) < 1e-5
    batch = await minilm.embed(TEXTS)
    assert [o.index for o in batch] == list(range(len(TEXTS)))
    assert cosine_distance([o.embedding for o in batch], st_vectors).max() < 1e-5
    assert abs(torch.tensor(batch[1].embedding).norm().item() - 1) < 1e-5  # Normalize module
    # concurrent callers share forward passes and still get their own vectors
    outs = await asyncio.gather(*(minilm.embed(t) for t in TEXTS))
    assert cosine_distance([o.embedding for o in outs], st_vectors).max() < 1e-5


@aio
async def test_token_ids_equal_text(minilm):
    ids = minilm.tokenize(TEXTS[1])
    by_text, by_ids = await minilm.embed([TEXTS[1]]), await minilm.embed(ids)
    assert by_ids.prompt_tokens == len(ids)
    assert torch.allclose(torch.tensor(by_text[0].embedding), torch.tensor(by_ids.embedding))


@aio
async def test_long_input_truncated_only_on_request(minilm):
    long_text = "word " * 2000
    with pytest.raises(InvalidRequest, match="truncate"):
        await minilm.embed(long_text)
    cut = await minilm.embed(long_text, truncate=True)
    assert cut.prompt_tokens == minilm.context_len
    ids = minilm.tokenize(long_text)  # [CLS] word ... [SEP]: truncation keeps [SEP]
    head = ids[:minilm.context_len - 1] + ids[-1:]
    assert cosine_distance(cut.embedding, (await minilm.embed(head)).embedding) < 1e-6
    with pytest.raises(InvalidRequest):
        await minilm.embed(list(range(1, 1000)))
    assert (await minilm.embed(list(range(1, 1000)), truncate=True)).prompt_tokens == 256


@aio
@pytest.mark.parametrize("bad", [[], "", [""], [[]], [1, "a"], [[1], "a"], 7, None, [1.5],
                                 [10 ** 9], [-1], [True]])
async def test_bad_input_rejected(minilm, bad):
    with pytest.raises(InvalidRequest) as err:
        await minilm.embed(bad)
    assert err.value.param == "input"


@aio
async def test_dimensions_need_a_matryoshka_model(minilm):
    assert len((await minilm.embed("x", dimensions=384)).embedding) == 384  # full size: fine
    for dims in (128, 0, 385, -1):
        with pytest.raises(InvalidRequest) as err:
            await minilm.embed("x", dimensions=dims)
        assert err.value.param == "dimensions"


@aio
async def test_embedding_engine_does_not_generate(minilm):
    with pytest.raises(InvalidRequest, match="embedding model"):
        await minilm.generate("Hello", {"max_new_tokens": 4})
    assert minilm.memory_state()["running"] == 0 and minilm.flush_cache()


def test_registry_points_encoders_to_is_embedding():
    with pytest.raises(ValueError, match="--is-embedding"):
        get_model_class(["BertModel"])
    assert get_model_class(["BertModel"], is_embedding=True).__name__ == "BertModel"


# --------------------------------------------------------------------------- decoders
def _save_tiny(tmp_path_factory, name: str, config, model_cls, st_pooling: dict | None):
    torch.manual_seed(0)
    hf = model_cls(config).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: make them count
        for pname, p in hf.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    if st_pooling is not None:  # sentence-transformers files, without a Normalize module
        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"}]))
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps(st_pooling))
    return hf, str(path)


async def _embed_ids(path: str, seqs, **kw):
    engine = Engine(model_path=path, is_embedding=True, skip_tokenizer_init=True)
    await engine.start()
    try:
        return await engine.embed(seqs, **kw)
    finally:
        await engine.shutdown()


def _last_hidden(base_model, ids) -> torch.Tensor:
    with torch.no_grad():
        return base_model(torch.tensor([ids])).last_hidden_state[0, -1]


@aio
async def test_mistral_last_token_matches_hf(tmp_path_factory):
    """e5-mistral layout: a bare MistralModel checkpoint (no `model.` prefix); the
    sentence-transformers config asks for last-token pooling without normalizing."""
    config = transformers.MistralConfig(**TINY, sliding_window=6)
    hf, path = _save_tiny(tmp_path_factory, "mistral", config, transformers.MistralModel,
                          {"word_embedding_dimension": 64, "pooling_mode": "lasttoken"})
    assert json.load(open(os.path.join(path, "config.json")))["architectures"] == ["MistralModel"]
    outs = await _embed_ids(path, SEQS)
    for ids, out in zip(SEQS, outs):
        assert rel_err(torch.tensor(out.embedding), _last_hidden(hf, ids)) < 1e-4


@aio
async def test_qwen2_last_token_matches_hf(tmp_path_factory):
    """gte-Qwen2 layout: a Qwen2ForCausalLM checkpoint (its LM head unused); no
    sentence-transformers files, so the default: last token, normalized. Matryoshka
    dimensions from the config: truncated, then renormalized."""
    config = transformers.Qwen2Config(**TINY, tie_word_embeddings=False,
                                      matryoshka_dimensions=[16, 32])
    hf, path = _save_tiny(tmp_path_factory, "qwen2", config, transformers.Qwen2ForCausalLM,
                          None)
    outs = await _embed_ids(path, SEQS)
    refs = [_last_hidden(hf.model, ids) for ids in SEQS]
    for out, ref in zip(outs, refs):
        assert rel_err(torch.tensor(out.embedding), F.normalize(ref, dim=-1)) < 1e-4
    short = await _embed_ids(path, SEQS[:2], dimensions=16)
    for out, ref in zip(short, refs):
        assert rel_err(torch.tensor(out.embedding), F.normalize(ref[:16], dim=-1)) < 1e-4
    with pytest.raises(InvalidRequest, match=r"\[16, 32\]"):
        await _embed_ids(path, SEQS[:1], dimensions=20)


# --------------------------------------------------------------------------- pooling
def test_pooling_modes_match_per_sequence_reference():
    gen = torch.Generator().manual_seed(0)
    lens = torch.tensor([3, 1, 5])
    hidden = torch.randn(int(lens.sum()), 8, generator=gen)
    positions = torch.cat([torch.arange(n) for n in lens.tolist()])
    parts = hidden.split(lens.tolist())
    expect = {
        "cls": [p[0] for p in parts], "lasttoken": [p[-1] for p in parts],
        "mean": [p.mean(0) for p in parts], "max": [p.max(0).values for p in parts],
        "mean_sqrt_len_tokens": [p.sum(0) / len(p) ** 0.5 for p in parts],
        "weightedmean": [(p * torch.arange(1, len(p) + 1)[:, None]).sum(0)
                         / sum(range(1, len(p) + 1)) for p in parts],
    }
    for mode, rows in expect.items():
        assert torch.allclose(pool(hidden, lens, positions, [mode]), torch.stack(rows),
                              atol=1e-6), mode
    both = pool(hidden, lens, positions, ["cls", "mean"])
    assert both.shape == (3, 16) and torch.allclose(both[:, 8:], torch.stack(expect["mean"]))


def test_pooling_config_discovery(tmp_path):
    hf = transformers.BertConfig(hidden_size=32)
    assert PoolingConfig.discover(None, hf, "cls") == PoolingConfig(("cls",), True, 32)
    minilm = PoolingConfig.discover(embedded_embedding_model_path(), hf, "cls")
    assert minilm.modes == ("mean",) and minilm.normalize and minilm.max_seq_length == 256
    (tmp_path / "modules.json").write_text(json.dumps([
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ModelLoadError, match="Dense"):
        PoolingConfig.discover(str(tmp_path), hf, "cls")
