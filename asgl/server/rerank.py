"""Cross-encoder scoring: POST /v1/rerank (also /rerank, /v2/rerank) and POST /v1/score
(also /score), in vLLM's shapes (Jina / Cohere-compatible rerank; vLLM's score API).

Each (query, document) pair is tokenized as the model's tokenizer pairs two texts
(`[CLS] query [SEP] document [SEP]` for BERT, with truncation to the context when
`truncate_prompt_tokens` / the context demands: the document side is cut first) and runs
through the cross-encoder's classification head (models/bert_classifier.py). With one
label the score is the sigmoid of its logit, as sentence-transformers' CrossEncoder and
vLLM report it. SGLang's /v1/rerank answers a bare list; we follow vLLM's object here,
which the rerank clients (Jina, Cohere, LangChain) read (docs/compatibility.md).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Optional, Union

import msgspec
from aiohttp import web

from asgl.server.embeddings import MAX_INPUTS, _embed
from asgl.server.errors import bad_request
from asgl.server.jsonio import json_response, read_json
from asgl.server.openai_common import response_model
from asgl.server.state import ServerState, get_state

_REQ = dict(forbid_unknown_fields=True, kw_only=True)


class RerankRequest(msgspec.Struct, **_REQ):
    query: str
    documents: list[Union[str, dict[str, Any]]]
    model: Optional[str] = None
    top_n: Optional[int] = None
    return_documents: Optional[bool] = None
    truncate_prompt_tokens: Optional[int] = None


class ScoreRequest(msgspec.Struct, **_REQ):
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]
    model: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = None


def _check_cross_encoder(state: ServerState) -> None:
    runner = getattr(getattr(state.engine, "embedder", None), "runner", None)
    model = getattr(runner, "model", None)
    if not hasattr(model, "classify"):
        raise bad_request("this server does not run a cross-encoder (a *ForSequenceClassification "
                          "model with --is-embedding): rerank and score need one", "model")
    if getattr(model, "num_labels", 1) != 1:
        raise bad_request(f"the model has {model.num_labels} labels; rerank and score need "
                          "a single relevance logit", "model")


def _pair_ids(state: ServerState, pairs: list[tuple[str, str]],
              truncate: Optional[int]) -> list[list[int]]:
    tokenizer = state.engine.tokenizer
    limit = state.context_len if truncate is None else min(truncate, state.context_len)
    if truncate is not None and truncate < 1:
        raise bad_request("truncate_prompt_tokens must be >= 1", "truncate_prompt_tokens")
    enc = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation="only_second",
                    max_length=limit)
    return enc["input_ids"]


async def _scores(state: ServerState, pairs: list[tuple[str, str]],
                  truncate: Optional[int]) -> tuple[list[float], int]:
    _check_cross_encoder(state)
    if not pairs:
        raise bad_request("nothing to score", "documents")
    if len(pairs) > MAX_INPUTS:
        raise bad_request(f"{len(pairs)} pairs; the limit is {MAX_INPUTS}", "documents")
    try:
        ids = _pair_ids(state, pairs, truncate)
    except Exception as e:  # a query longer than the context leaves no room for a document
        raise bad_request(f"these texts cannot be paired within the context: {e}",
                          "query") from None
    outs = await _embed(state, ids, False, None)
    scores = [1.0 / (1.0 + math.exp(-o.embedding[0])) for o in outs]
    return scores, sum(o.prompt_tokens for o in outs)


async def rerank(request: web.Request) -> web.Response:
    state = get_state(request)
    req = await read_json(request, RerankRequest)
    texts = [d if isinstance(d, str) else d.get("text") for d in req.documents]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise bad_request(f"documents {bad[:10]} are neither text nor {{\"text\": ...}}",
                          "documents")
    scores, tokens = await _scores(state, [(req.query, t) for t in texts],
                                   req.truncate_prompt_tokens)
    order = sorted(range(len(texts)), key=lambda i: -scores[i])
    if req.top_n is not None:
        if req.top_n < 1:
            raise bad_request("top_n must be >= 1", "top_n")
        order = order[:req.top_n]
    results = [{"index": i, "document": {"text": texts[i]} if req.return_documents is not False
                else None, "relevance_score": scores[i]} for i in order]
    return json_response({"id": f"rerank-{uuid.uuid4().hex}",
                          "model": response_model(state, req.model),
                          "usage": {"total_tokens": tokens}, "results": results})


async def score(request: web.Request) -> web.Response:
    state = get_state(request)
    req = await read_json(request, ScoreRequest)
    left = [req.text_1] if isinstance(req.text_1, str) else req.text_1
    right = [req.text_2] if isinstance(req.text_2, str) else req.text_2
    if len(left) == 1:
        pairs = [(left[0], r) for r in right]  # one against many
    elif len(left) == len(right):
        pairs = list(zip(left, right))
    else:
        raise bad_request(f"text_1 has {len(left)} texts and text_2 {len(right)}: give one "
                          f"text_1, or as many as text_2", "text_1")
    scores, tokens = await _scores(state, pairs, req.truncate_prompt_tokens)
    return json_response({
        "id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
        "model": response_model(state, req.model),
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def add_routes(app: web.Application) -> None:
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        app.router.add_post(path, rerank)
    for path in ("/v1/score", "/score"):
        app.router.add_post(path, score)
