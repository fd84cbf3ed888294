"""Server protocol without a server: request structs, response shapes (checked against the
official openai SDK's pydantic models), error bodies, the OpenAPI document, limits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgl.config import EngineConfig
from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.server import limits
from asgl.server.errors import ApiError, error_body
from asgl.server.metrics import Metrics
from asgl.server.openai_common import chat_logprobs, completion_logprobs
from asgl.server.openapi import openapi_document
from asgl.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice,
                                  ChatCompletionChunk, ChatCompletionRequest,
                                  ChatCompletionResponse, CompletionChoice, CompletionRequest,
                                  CompletionResponse, Delta, GenerateRequest, ModelCard,
                                  ModelList, PromptTokensDetails, Usage)
from asgl.server.state import ServerState
from asgl.server.tokens import TokenTexts

REQUEST_TYPES = [GenerateRequest, CompletionRequest, ChatCompletionRequest]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False,
                                                                         allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)


@pytest.mark.parametrize("typ", REQUEST_TYPES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_values)
def test_any_json_decodes_or_fails_cleanly(typ, body):
    """Whatever JSON arrives, decoding gives the struct or a msgspec error (a 400)."""
    raw = json.dumps(body).encode()
    try:
        msgspec.json.decode(raw, type=typ)
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=64))
def test_any_bytes_decode_or_fail_cleanly(raw):
    for typ in REQUEST_TYPES:
        try:
            msgspec.json.decode(raw, type=typ)
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass


def test_unknown_and_mistyped_fields_are_named():
    with pytest.raises(msgspec.ValidationError, match="unknown field `tool_box`"):
        msgspec.json.decode(b'{"prompt": "x", "tool_box": 1}', type=CompletionRequest)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.n"):
        msgspec.json.decode(b'{"prompt": "x", "n": "two"}', type=CompletionRequest)
    with pytest.raises(msgspec.ValidationError, match="missing required field `messages`"):
        msgspec.json.decode(b'{"model": "m"}', type=ChatCompletionRequest)


def test_explicit_nulls_are_accepted():
    """Real clients send null for optional fields."""
    req = msgspec.json.decode(b'{"model": null, "prompt": "x", "temperature": null, "n": null,'
                              b' "stop": null, "stream_options": null}', type=CompletionRequest)
    assert req.temperature is None and req.n is None


def _usage() -> Usage:
    return Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=1))


def test_responses_match_the_openai_sdk_models():
    from openai.types import Completion, Model
    from openai.types.chat import ChatCompletion
    from openai.types.chat import ChatCompletionChunk as SdkChunk

    texts = TokenTexts(SimpleNamespace(decode=lambda ids: f"<{ids[0]}>"))
    # (an echoed prompt's first token has null logprobs, as with OpenAI; the SDK's parser
    # is lenient there but its strict pydantic model is not, so this table has none)
    lp, end = completion_logprobs(texts, [(-0.25, 1), (-0.5, 2)], [[], [(-0.5, 2), (-1.0, 3)]],
                                  7)
    assert lp.text_offset == [7, 10] and end == 13
    assert lp.top_logprobs[0] == {"<1>": -0.25}  # the sampled token is always listed
    comp = CompletionResponse(id="cmpl-1", created=1, model="m", usage=_usage(), choices=[
        CompletionChoice(index=0, text="ab", logprobs=lp, finish_reason="length")])
    data = json.loads(msgspec.json.encode(comp))
    assert list(data) == ["id", "object", "created", "model", "choices", "usage",
                          "system_fingerprint"]
    parsed = Completion.model_validate(data)
    assert parsed.choices[0].logprobs.top_logprobs[1] == {"<2>": -0.5, "<3>": -1.0}
    assert parsed.usage.prompt_tokens_details.cached_tokens == 1

    clp = chat_logprobs(texts, [(-0.5, 2)], [[(-0.5, 2), (-1.0, 3)]], 1)
    chat = ChatCompletionResponse(id="chatcmpl-1", created=1, model="m", usage=_usage(),
                                  choices=[ChatChoice(index=0, message=AssistantMessage(
                                      content="hi"), logprobs=clp, finish_reason="stop")])
    parsed = ChatCompletion.model_validate(json.loads(msgspec.json.encode(chat)))
    assert parsed.choices[0].message.role == "assistant"
    assert [t.token for t in parsed.choices[0].logprobs.content[0].top_logprobs] == ["<2>"]

    first = ChatCompletionChunk(id="c", created=1, model="m", choices=[
        ChatChunkChoice(index=0, delta=Delta(role="assistant", content=""))])
    data = json.loads(msgspec.json.encode(first))
    assert "usage" not in data and data["choices"][0]["finish_reason"] is None
    assert data["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    SdkChunk.model_validate(data)
    last = ChatCompletionChunk(id="c", created=1, model="m", choices=[], usage=_usage())
    assert SdkChunk.model_validate(json.loads(msgspec.json.encode(last))).usage.total_tokens == 5

    models = ModelList(data=[ModelCard(id="m", created=1)])
    Model.model_validate(json.loads(msgspec.json.encode(models))["data"][0])


def test_error_body_shape():
    body = json.loads(msgspec.json.encode(error_body(400, "bad n", "n")))
    assert body == {"error": {"message": "bad n", "type": "invalid_request_error",
                              "param": "n", "code": None}}


def test_openapi_document_validates_real_bodies():
    doc = openapi_document()
    schemas = doc["components"]["schemas"]
    assert {"/generate", "/v1/completions", "/v1/chat/completions"} <= set(doc["paths"])

    def validate(path: str, body: dict) -> None:
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        jsonschema.validate(body, {**ref, "components": {"schemas": schemas}})

    validate("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2}})
    validate("/v1/completions", {"model": "default", "prompt": [1, 2], "max_tokens": 2})
    validate("/v1/chat/completions", {"model": "default", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    with pytest.raises(jsonschema.ValidationError):
        validate("/v1/completions", {"prompt": "x", "surprise": 1})


def _state(**cfg) -> ServerState:
    engine = SimpleNamespace(context_len=100, vocab_size=50, tokenizer=None,
                             scheduler=SimpleNamespace(waiting=[1, 2, 3]))
    return ServerState(engine=engine, config=EngineConfig(**cfg), metrics=Metrics(),
                       model_name="m", token_texts=TokenTexts(None))


def test_limits():
    state = _state(max_queued_requests=4)
    with pytest.raises(ApiError, match="n must be <= 128") as e:
        limits.check_sampling(state, SamplingParams(n=5_000_000))
    assert e.value.param == "n"
    assert limits.check_sampling(state, SamplingParams(top_k=10**9)).top_k == -1
    with pytest.raises(ApiError, match="outside the vocabulary"):
        limits.check_prompt(state, [1, 50], None, None, "input_ids")
    with pytest.raises(ApiError, match="ask for at most 90"):
        limits.check_prompt(state, list(range(10)), 91, "max_tokens", "prompt")
    limits.check_prompt(state, list(range(10)), 90, "max_tokens", "prompt")
    limits.check_prompt(state, list(range(10)), 10**6, None, "prompt")  # a default: capped
    with pytest.raises(ApiError, match=r"top_logprobs_num must be in \[0, 20\]"):
        limits.check_logprobs(state, 1_000_000_000, -1, 10)
    limits.check_admission(state, 1)
    with pytest.raises(ApiError) as e:
        limits.check_admission(state, 2)
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
