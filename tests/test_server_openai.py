"""The OpenAI-compatible API on a live `asgl serve`, driven by the official openai SDK."""

from __future__ import annotations

import openai
import pytest

from server_fixture import ServerProcess, main_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)

PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are a helpful AI assistant"},
        {"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def client(main_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=main_server.base_url, api_key="EMPTY", max_retries=0)


def test_models(client, main_server):
    models = client.models.list().data
    assert len(models) == 1 and models[0].object == "model"
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_completion(client):
    r = client.completions.create(model="default", prompt=PROMPT, temperature=0, max_tokens=6)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "default"
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].logprobs is None
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 6
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0
    again = client.completions.create(model="default", prompt=PROMPT, temperature=0, max_tokens=6)
    assert again.choices[0].text == r.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the radix cache


def test_chat(client):
    r = client.chat.completions.create(model="default", messages=CHAT, temperature=0,
                                       max_tokens=8)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8
    # max_completion_tokens (the newer name) wins over max_tokens
    r = client.chat.completions.create(model="default", messages=CHAT, temperature=0,
                                       max_tokens=8, max_completion_tokens=2)
    assert r.usage.completion_tokens <= 2


def test_completion_stream_equals_non_stream(client):
    args = dict(model="default", prompt=PROMPT, temperature=0, max_tokens=10)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True,
                                            stream_options={"include_usage": True}))
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.id == chunks[0].id for c in chunks)


def test_chat_stream_equals_non_stream(client):
    args = dict(model="default", messages=CHAT, temperature=0, max_tokens=10)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    # without include_usage there is no usage chunk
    plain = list(client.chat.completions.create(**args, stream=True))
    assert all(c.choices and c.usage is None for c in plain)


def test_n_and_seed(client):
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=5, n=2,
                                  temperature=1.0, seed=123)
    assert [c.index for c in r.choices] == [0, 1]
    again = client.completions.create(model="default", prompt=PROMPT, max_tokens=5, n=2,
                                      temperature=1.0, seed=123)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    chat = client.chat.completions.create(model="default", messages=CHAT, max_tokens=4, n=2,
                                          temperature=0.9, seed=7)
    assert [c.index for c in chat.choices] == [0, 1]
    chunks = list(client.chat.completions.create(model="default", messages=CHAT, max_tokens=3,
                                                 n=2, stream=True, seed=7, temperature=0.9))
    assert {c.choices[0].index for c in chunks} == {0, 1}
    batch = client.completions.create(model="default", prompt=["Hello", "Bye"], n=2,
                                      max_tokens=2, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]


def test_completion_logprobs_and_echo(client):
    r = client.completions.create(model="default", prompt=PROMPT, temperature=0, max_tokens=4,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(val)
    assert lp.text_offset == sorted(lp.text_offset)
    echo = client.completions.create(model="default", prompt=PROMPT, temperature=0,
                                     max_tokens=4, logprobs=1, echo=True)
    assert echo.choices[0].text == PROMPT + r.choices[0].text
    elp = echo.choices[0].logprobs
    assert elp.token_logprobs[0] is None
    assert len(elp.tokens) == echo.usage.prompt_tokens + echo.usage.completion_tokens
    only_prompt = client.completions.create(model="default", prompt=PROMPT, max_tokens=0,
                                            echo=True)
    assert only_prompt.choices[0].text == PROMPT and only_prompt.usage.completion_tokens == 0


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="default", messages=CHAT, temperature=0,
                                       max_tokens=4, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    chunks = list(client.chat.completions.create(model="default", messages=CHAT, temperature=0,
                                                 max_tokens=4, logprobs=True, top_logprobs=2,
                                                 stream=True))
    streamed = [t.token for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]


def test_stop_and_sampling_knobs(client):
    base = client.completions.create(model="default", prompt=PROMPT, temperature=0,
                                     max_tokens=12, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    words = [w for w in text.split() if w.strip(".,")]
    assert len(words) >= 2, text
    stop = words[1]
    r = client.completions.create(model="default", prompt=PROMPT, temperature=0,
                                  max_tokens=12, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(stop)]
    r = client.chat.completions.create(
        model="default", messages=CHAT, max_tokens=3, temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, user="tester",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 1})
    assert r.usage.completion_tokens >= 1


def test_logit_bias(client):
    token = 1000  # any ordinary token id: a +100 bias makes it certain
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=3,
                                  logit_bias={str(token): 100}, logprobs=0,
                                  extra_body={"ignore_eos": True})
    tokens = r.choices[0].logprobs.tokens
    assert len(tokens) == 3 and len(set(tokens)) == 1  # the same token three times
    assert r.choices[0].text == tokens[0] * 3


@pytest.mark.parametrize("kwargs, param", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=100000), "max_tokens"),
    (dict(n=5000000), "n"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(logprobs=True, top_logprobs=50), "top_logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(tools=[{"type": "function", "function": {"name": "no spaces"}}]),
     "tools[0].function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}],
          tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice"),
    (dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}), "response_format"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(extra_body={"best_of_luck": 1}), "best_of_luck"),
    (dict(logit_bias={"-5": 1}), "logit_bias"),
    (dict(extra_body={"regex": "[a-z"}), "regex"),
    (dict(messages=[{"role": "function", "content": "x", "name": "f"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), "messages[0].content"),
])
def test_chat_errors(client, kwargs, param):
    args = dict(model="default", messages=CHAT, max_tokens=2)
    args.update(kwargs)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == 400
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


@pytest.mark.parametrize("kwargs, param", [
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[1, "a"]), "prompt"),
    (dict(prompt=[[1, 2], [10**9]]), "prompt"),
    (dict(logprobs=21), "logprobs"),
    (dict(suffix="x"), "suffix"),
    (dict(best_of=3), "best_of"),
    (dict(extra_body={"n": "2"}), "n"),
])
def test_completion_errors(client, kwargs, param):
    args = dict(model="default", prompt=PROMPT, max_tokens=2)
    args.update(kwargs)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.body["param"] == param
