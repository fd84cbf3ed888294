"""Issue 24, part 1: the request fields and small routes that SGLang's and vLLM's clients
send, on a live `asgl serve` (the embedded SmolLM2), with the official openai client or
plain HTTP. Each test asserts the behaviour the peer documents, not only a 200; the
expected values come from another route of the same server (a completion on the same
tokens, the chat route's usage) or from the greedy output without the field.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid

import openai
import pytest

from server_fixture import KV_TOKENS, CONTEXT_LEN, ServerProcess, main_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)

CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def client(main_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=main_server.base_url, api_key="EMPTY", max_retries=0)


def _post(server: ServerProcess, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(server: ServerProcess, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --------------------------------------------------------------------------- tokenize


def test_tokenize_prompt_matches_completion_usage(client, main_server):
    text = "The capital of France is"
    status, tok = _post(main_server, "/tokenize", {"prompt": text})
    assert status == 200
    usage = client.completions.create(model="default", prompt=text, max_tokens=1,
                                      temperature=0).usage
    assert tok["count"] == len(tok["tokens"]) == usage.prompt_tokens
    assert tok["max_model_len"] == CONTEXT_LEN and tok["token_strs"] is None
    # the completion of those ids equals the completion of the text
    by_ids = client.completions.create(model="default", prompt=tok["tokens"], max_tokens=4,
                                       temperature=0)
    by_text = client.completions.create(model="default", prompt=text, max_tokens=4,
                                        temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    status, v1 = _post(main_server, "/v1/tokenize", {"prompt": text,
                                                    "return_token_strs": True})
    assert v1["tokens"] == tok["tokens"] and len(v1["token_strs"]) == v1["count"]
    status, back = _post(main_server, "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and back["prompt"] == text
    status, back = _post(main_server, "/v1/detokenize", {"tokens": tok["tokens"]})
    assert back["prompt"] == text


def test_tokenize_add_special_tokens(main_server):
    # a template-rendered prompt holds its own special tokens: add_special_tokens=True on
    # text that the tokenizer would prefix adds the tokenizer's (vLLM semantics); the
    # difference is exactly the ids encode() adds, so never fewer
    _, plain = _post(main_server, "/tokenize", {"prompt": "hi", "add_special_tokens": False})
    _, special = _post(main_server, "/tokenize", {"prompt": "hi", "add_special_tokens": True})
    assert special["tokens"][-plain["count"]:] == plain["tokens"]
    _, back = _post(main_server, "/detokenize", {"tokens": plain["tokens"]})
    assert back["prompt"] == "hi"


def test_tokenize_chat_messages_match_chat_usage(client, main_server):
    status, tok = _post(main_server, "/tokenize", {"messages": CHAT})
    assert status == 200
    usage = client.chat.completions.create(model="default", messages=CHAT, max_tokens=1,
                                           temperature=0).usage
    assert tok["count"] == usage.prompt_tokens
    _, text = _post(main_server, "/detokenize", {"tokens": tok["tokens"]})
    assert text["prompt"].endswith("<|im_start|>assistant\n")  # the generation prompt
    _, no_gen = _post(main_server, "/tokenize", {"messages": CHAT,
                                                 "add_generation_prompt": False})
    assert no_gen["count"] < tok["count"]


def test_tokenize_errors(main_server):
    status, err = _post(main_server, "/tokenize", {"prompt": "x", "nonsense": 1})
    assert status == 400 and "nonsense" in err["error"]["message"]
    status, err = _post(main_server, "/detokenize", {"tokens": [10 ** 9]})
    assert status == 400 and err["error"]["param"] == "tokens"


# --------------------------------------------------------------------------- chat fields


def test_continue_final_message_and_echo(client, main_server):
    partial = "My favourite color is"
    messages = CHAT + [{"role": "assistant", "content": partial}]
    extra = {"continue_final_message": True, "add_generation_prompt": False}
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=6,
                                       temperature=0, extra_body=extra)
    _, tok = _post(main_server, "/tokenize", {"messages": messages, **extra})
    _, rendered = _post(main_server, "/detokenize", {"tokens": tok["tokens"]})
    assert rendered["prompt"].endswith(partial)  # no end of turn after the partial message
    # the same tokens through /v1/completions: the same continuation
    same = client.completions.create(model="default", prompt=tok["tokens"], max_tokens=6,
                                     temperature=0)
    assert r.choices[0].message.content == same.choices[0].text
    assert r.usage.prompt_tokens == tok["count"]
    echoed = client.chat.completions.create(model="default", messages=messages, max_tokens=6,
                                            temperature=0, extra_body={**extra, "echo": True})
    assert echoed.choices[0].message.content == partial + same.choices[0].text
    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=6,
                                            temperature=0, stream=True,
                                            extra_body={**extra, "echo": True})
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == partial + same.choices[0].text
    with pytest.raises(openai.BadRequestError, match="continue_final_message"):
        client.chat.completions.create(model="default", messages=CHAT, max_tokens=2,
                                       extra_body=extra)


def test_custom_role_reaches_the_template(main_server):
    # SmolLM2's template writes any role as <|im_start|>role; vLLM accepts custom roles
    messages = [{"role": "narrator", "content": "Once upon a time."}] + CHAT
    status, tok = _post(main_server, "/tokenize", {"messages": messages})
    assert status == 200
    _, text = _post(main_server, "/detokenize", {"tokens": tok["tokens"]})
    assert "<|im_start|>narrator\nOnce upon a time." in text["prompt"]
    status, r = _post(main_server, "/v1/chat/completions",
                      {"messages": messages, "max_tokens": 2,
                       "chat_template_kwargs": {"messages": []}})
    assert status == 400 and "messages" in r["error"]["message"]


def test_reasoning_fields_accepted(client):
    # no --reasoning-parser here: separate_reasoning changes nothing; reasoning_effort is a
    # template variable (SmolLM2's template ignores it), so the answer is the same
    plain = client.chat.completions.create(model="default", messages=CHAT, max_tokens=5,
                                           temperature=0)
    r = client.chat.completions.create(model="default", messages=CHAT, max_tokens=5,
                                       temperature=0, reasoning_effort="low",
                                       extra_body={"separate_reasoning": True,
                                                   "chat_template_kwargs": {"x": 1}})
    assert r.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        client.chat.completions.create(model="default", messages=CHAT, max_tokens=2,
                                       reasoning_effort="extreme")


# --------------------------------------------------------------------------- stops


def _greedy(client, prompt: str, n: int = 12, **extra) -> openai.types.Completion:
    return client.completions.create(model="default", prompt=prompt, max_tokens=n,
                                     temperature=0, extra_body=extra or None)


def test_matched_stop(client, main_server):
    prompt = "List three fruits: apple, banana,"
    base = _greedy(client, prompt).choices[0]
    assert base.finish_reason == "length" and base.model_extra["matched_stop"] is None
    word = base.text.split()[1]  # a later word of the greedy text
    r = client.completions.create(model="default", prompt=prompt, max_tokens=12,
                                  temperature=0, stop=[word])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["matched_stop"] == word
    assert r.choices[0].text == base.text[:base.text.index(word)]
    # a stop token id: matched_stop is the id (SGLang)
    _, tok = _post(main_server, "/tokenize", {"prompt": base.text, "add_special_tokens": False})
    stop_id = tok["tokens"][2]
    chat = client.chat.completions.create(model="default", messages=CHAT, max_tokens=40,
                                          temperature=0)
    assert chat.choices[0].model_extra["matched_stop"] in (None, 2)  # EOS id or length
    r = client.completions.create(model="default", prompt=prompt, max_tokens=12,
                                  temperature=0, extra_body={"stop_token_ids": [stop_id]})
    assert r.choices[0].model_extra["matched_stop"] == stop_id
    stream = client.completions.create(model="default", prompt=prompt, max_tokens=12,
                                       temperature=0, stop=[word], stream=True)
    last = [c for c in stream][-1].choices[0]
    assert last.finish_reason == "stop" and last.model_extra["matched_stop"] == word


def test_stop_regex_openai_and_generate(client, main_server):
    prompt = "List three fruits: apple, banana,"
    base = _greedy(client, prompt).choices[0].text
    words = base.split()
    target = words[1]
    pattern = target[:2] + r"\w*"
    start = base.index(target[:2])  # the first place the pattern matches
    r = client.completions.create(model="default", prompt=prompt, max_tokens=12,
                                  temperature=0, extra_body={"stop_regex": pattern})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.text == base[:start]
    assert c.model_extra["matched_stop"].startswith(target[:2])
    stream = client.completions.create(model="default", prompt=prompt, max_tokens=12,
                                       temperature=0, stream=True,
                                       extra_body={"stop_regex": [pattern]})
    assert "".join(x.choices[0].text for x in stream) == base[:start]
    # SGLang's native route and its clients (RuntimeEndpoint) send it in sampling_params
    status, out = _post(main_server, "/generate", {
        "text": prompt, "sampling_params": {"max_new_tokens": 12, "temperature": 0,
                                            "stop_regex": pattern}})
    assert status == 200 and out["text"] == base[:start]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert out["meta_info"]["finish_reason"]["matched"].startswith(target[:2])
    status, out = _post(main_server, "/generate", {
        "text": prompt, "sampling_params": {"max_new_tokens": 12, "temperature": 0,
                                            "stop_regex": pattern, "no_stop_trim": True}})
    assert out["text"].startswith(base[:start] + target[:2])
    status, err = _post(main_server, "/generate", {
        "text": prompt, "sampling_params": {"stop_regex": "(unclosed"}})
    assert status == 400 and err["error"]["param"] == "stop_regex"


# --------------------------------------------------------------------------- usage, salt


def test_continuous_usage_stats(client):
    stream = client.chat.completions.create(
        model="default", messages=CHAT, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in with_choices]
    assert counts == sorted(counts) and counts[-1] == chunks[-1].usage.completion_tokens
    assert len({c.usage.prompt_tokens for c in chunks}) == 1
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens <= 6
    plain = client.chat.completions.create(
        model="default", messages=CHAT, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True})
    plain = list(plain)
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage is not None
    comp = list(client.completions.create(
        model="default", prompt="Hello", max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in comp)


def test_cache_salt_separates_prefix_cache(client):
    prompt = f"Salted prompt {uuid.uuid4().hex}: " + "tell me about the sea. " * 8

    def cached(**extra) -> int:
        r = client.completions.create(model="default", prompt=prompt, max_tokens=1,
                                      temperature=0, extra_body=extra or None)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached(cache_salt="tenant-a") == 0
    assert cached(cache_salt="tenant-a") > 0  # same salt: shared
    assert cached(cache_salt="tenant-b") == 0  # another salt: never shared
    assert cached() == 0  # unsalted requests don't see salted entries
    assert cached() > 0
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        cached(cache_salt="")


def test_cache_salt_on_generate(main_server):
    text = f"Generate salt {uuid.uuid4().hex} " + "and so on " * 8
    body = {"text": text, "sampling_params": {"max_new_tokens": 1}, "cache_salt": "s1"}
    assert _post(main_server, "/generate", body)[1]["meta_info"]["cached_tokens"] == 0
    assert _post(main_server, "/generate", body)[1]["meta_info"]["cached_tokens"] > 0
    body["cache_salt"] = "s2"
    assert _post(main_server, "/generate", body)[1]["meta_info"]["cached_tokens"] == 0


# --------------------------------------------------------------------------- admin routes


def test_abort_all(main_server):
    results: list = []

    def run() -> None:
        results.append(_post(main_server, "/generate", {
            "text": "Count to a thousand:", "sampling_params": {
                "max_new_tokens": 800, "ignore_eos": True, "temperature": 0}}))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while main_server.memory_state()["running"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, out = _post(main_server, "/abort_request", {"abort_all": True})
    assert status == 200 and out["success"] and len(out["aborted"]) == 2
    for t in threads:
        t.join(60)
    assert [r[1]["meta_info"]["finish_reason"]["type"] for r in results] == ["abort", "abort"]
    assert all(r[1]["meta_info"]["completion_tokens"] < 800 for r in results)
    status, err = _post(main_server, "/abort_request", {})
    assert status == 400 and "abort_all" in err["error"]["message"]


def test_trailing_slashes_and_server_info(main_server):
    assert _get(main_server, "/health/")[0] == 200
    status, body = _get(main_server, "/v1/models/")
    assert status == 200 and json.loads(body)["data"][0]["object"] == "model"
    status, body = _get(main_server, "/server_info")
    info = json.loads(body)
    assert status == 200 and info["max_total_num_tokens"] == KV_TOKENS
    assert json.loads(_get(main_server, "/get_server_info")[1])["max_total_num_tokens"] == \
        info["memory_state"]["capacity"]


# --------------------------------------------------------------------------- errors


def test_logit_bias_error_names_every_bad_key(main_server):
    status, err = _post(main_server, "/v1/completions", {
        "prompt": "hi", "max_tokens": 1, "logit_bias": {"abc": 1, "99999999": 2, "-1": 3,
                                                        "5": 1}})
    assert status == 400 and err["error"]["param"] == "logit_bias"
    message = err["error"]["message"]
    assert all(k in message for k in ("'abc'", "99999999", "-1")) and " 5" not in message


def test_unknown_fields_stay_400_naming_them(main_server):
    status, err = _post(main_server, "/v1/chat/completions",
                        {"messages": CHAT, "max_tokens": 1, "not_a_field": 1})
    assert status == 400 and "not_a_field" in err["error"]["message"]
    status, err = _post(main_server, "/generate",
                        {"text": "hi", "token_ids_logprob": [1, 2]})
    assert status == 400 and "not supported yet" in err["error"]["message"]


# --------------------------------------------------------------------------- structural_tag

COLOR = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "blue"]}},
         "required": ["color"]}


def test_structural_tag_xgrammar_form(client):
    fmt = {"type": "structural_tag", "format": {
        "type": "tag", "begin": "<answer>", "content": {"type": "json_schema",
                                                       "json_schema": COLOR},
        "end": "</answer>"}}
    r = client.chat.completions.create(model="default", messages=CHAT, max_tokens=40,
                                       temperature=0, response_format=fmt)
    text = r.choices[0].message.content
    assert text.startswith("<answer>") and text.endswith("</answer>"), text
    assert json.loads(text[len("<answer>"):-len("</answer>")])["color"] in ("red", "blue")
    r = client.completions.create(model="default", prompt="Pick a color:", max_tokens=40,
                                  temperature=0, extra_body={"response_format": fmt})
    assert r.choices[0].text.startswith("<answer>{")


def test_structural_tag_legacy_form(client):
    from asgl.server.structural_tag import structural_tag_of

    fmt = {"type": "structural_tag", "triggers": ["<answer"],
           "structures": [{"begin": "<answer=color>", "schema": COLOR, "end": "</answer>"}]}
    spec = json.loads(structural_tag_of(fmt))
    assert spec["format"]["type"] == "triggered_tags"
    assert spec["format"]["tags"][0]["content"]["json_schema"] == COLOR
    messages = [{"role": "user", "content": "Write <answer=color> then a JSON object with a "
                                            "color, then </answer>."}]
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=60,
                                       temperature=0, response_format=fmt)
    text = r.choices[0].message.content
    if "<answer" in text:  # once triggered, the structure is enforced
        body = text.split("<answer=color>", 1)[1]
        assert json.loads(body.split("</answer>", 1)[0])["color"] in ("red", "blue")
    bad = {"type": "structural_tag", "triggers": ["<x"],
           "structures": [{"begin": "<answer>", "schema": COLOR, "end": "</answer>"}]}
    with pytest.raises(openai.BadRequestError, match="triggers"):
        client.chat.completions.create(model="default", messages=CHAT, max_tokens=2,
                                       response_format=bad)


def test_frontend_sends_stop_regex(client, main_server):
    """The frontend's gen(stop_regex=...) through RuntimeEndpoint (SGLang's /generate
    client) and through the OpenAI backend: the same cut as the server's own route."""
    import asgl.lang as sgl

    prompt = "List three fruits: apple, banana,"
    base = _greedy(client, prompt).choices[0].text
    pattern = base.split()[1][:2] + r"\w*"
    start = base.index(base.split()[1][:2])

    @sgl.function
    def fruits(s):
        s += prompt + sgl.gen("out", max_tokens=12, temperature=0, stop_regex=pattern)

    for backend in (sgl.RuntimeEndpoint(main_server.url),
                    sgl.OpenAI("default", base_url=main_server.base_url, api_key="EMPTY")):
        assert fruits.run(backend=backend)["out"] == base[:start], backend
