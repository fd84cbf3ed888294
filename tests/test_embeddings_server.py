"""`asgl serve --is-embedding` (the embedded all-MiniLM-L6-v2) over HTTP: SGLang's README
embeddings snippet verbatim, /v1/embeddings through the openai SDK against
sentence-transformers, token-id inputs, base64, truncation, /encode, and 400s.

One server subprocess, on a free port (the README's 30000 is rewritten in its snippet),
stopped when this module ends."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F

from asgl.models.loader import embedded_embedding_model_path
from server_fixture import SGLANG_DEFAULT_PORT, ServerProcess, free_port

pytestmark = pytest.mark.timeout(300)

# SGLang README: the client lines of its OpenAI snippet, then its embeddings lines.
README_SNIPPET = '''import openai
client = openai.Client(
base_url="http://127.0.0.1:30000/v1", api_key="EMPTY")
# Text embedding
response = client.embeddings.create(
model="default",
input="How are you today",
)
print(response)
'''
TEXTS = ["How are you today", "The quick brown fox jumps over the lazy dog.", "a",
         "Embeddings map text to vectors."]
CONTEXT = 512  # the fixture's --context-length 1024, capped to BERT's 512 positions


@pytest.fixture(scope="module")
def spawned():
    port = free_port()
    proc = ServerProcess(["--is-embedding"], port)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(spawned) -> torch.Tensor:
    """sentence-transformers' vectors, computed while the server boots."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(embedded_embedding_model_path(), device="cpu")
    return st.encode(TEXTS, convert_to_tensor=True)


@pytest.fixture(scope="module")
def server(spawned, reference) -> ServerProcess:
    spawned.wait_ready()
    return spawned


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)


def cosine_distance(a, b) -> torch.Tensor:
    return 1 - F.cosine_similarity(torch.as_tensor(a, dtype=torch.float64),
                                   torch.as_tensor(b, dtype=torch.float64), dim=-1)


def post(server: ServerProcess, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_readme_snippet(server, reference):
    snippet = README_SNIPPET if server.port == SGLANG_DEFAULT_PORT else \
        README_SNIPPET.replace(":30000", f":{server.port}")
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("CreateEmbeddingResponse(data=[Embedding(embedding=[")
    assert "model='default'" in out.stdout and "prompt_tokens=6" in out.stdout
    vector = json.loads(out.stdout.split("embedding=", 1)[1].split("]", 1)[0] + "]")
    assert cosine_distance(vector, reference[0]) < 1e-5


def test_sdk_single_and_batch_match_sentence_transformers(client, reference):
    one = client.embeddings.create(model="default", input=TEXTS[0])  # SDK asks for base64
    assert one.object == "list" and one.model == "default" and len(one.data) == 1
    assert one.usage.prompt_tokens == one.usage.total_tokens == 6
    assert cosine_distance(one.data[0].embedding, reference[0]) < 1e-5
    batch = client.embeddings.create(model="m", input=TEXTS, encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2, 3] and batch.model == "m"
    assert cosine_distance([d.embedding for d in batch.data], reference).max() < 1e-5


def test_base64_and_token_ids(server, reference):
    status, floats = post(server, "/v1/embeddings", {"input": TEXTS[:2]})
    assert status == 200 and floats["data"][0]["object"] == "embedding"
    status, b64 = post(server, "/v1/embeddings", {"input": TEXTS[:2], "encoding_format": "base64"})
    assert status == 200
    for f, b in zip(floats["data"], b64["data"]):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == f["embedding"]  # the same float32 values
    ids = [101, 2129, 2024, 2017, 2651, 102]  # "How are you today" with [CLS] ... [SEP]
    for body in ({"input": ids}, {"input": [ids, ids[:3] + [102]]}):
        status, r = post(server, "/v1/embeddings", body)
        assert status == 200 and r["usage"]["prompt_tokens"] == sum(
            len(x) for x in (body["input"] if isinstance(body["input"][0], list) else [ids]))
        assert cosine_distance(r["data"][0]["embedding"], reference[0]) < 1e-5


def test_long_input_truncated_only_when_asked(server):
    huge = "hello " * 100_000  # 100k tokens
    status, err = post(server, "/v1/embeddings", {"input": huge})
    assert status == 400 and err["error"]["param"] == "input" and "truncate" in \
        err["error"]["message"]
    status, r = post(server, "/v1/embeddings", {"input": [huge, "short"], "truncate": True})
    assert status == 200 and r["usage"]["prompt_tokens"] == CONTEXT + 3
    status, r = post(server, "/encode", {"input_ids": list(range(1000, 2000)), "truncate": True})
    assert status == 200 and r["meta_info"]["prompt_tokens"] == CONTEXT


@pytest.mark.parametrize("body,param", [
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": 5}, "input"),
    ({"input": {"text": "x"}}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": [[1, 2], [3.5]]}, "input"),
    ({"input": [50_000]}, "input"),
    ({}, "input"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "x", "dimensions": 128}, "dimensions"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "bogus": 1}, "bogus"),
    ({"input": ["x"] * 2049}, "input"),
])
def test_bad_requests_get_400(server, body, param):
    status, err = post(server, "/v1/embeddings", body)
    assert status == 400, err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param


def test_encode_and_other_routes(server, reference):
    status, one = post(server, "/encode", {"text": TEXTS[0]})
    assert status == 200 and one["meta_info"]["prompt_tokens"] == 6
    assert cosine_distance(one["embedding"], reference[0]) < 1e-5
    status, many = post(server, "/encode", {"text": TEXTS[:2], "rid": ["a", "b"]})
    assert status == 200 and [m["meta_info"]["id"] for m in many] == ["a", "b"]
    assert cosine_distance([m["embedding"] for m in many], reference[:2]).max() < 1e-5
    status, err = post(server, "/encode", {"text": []})
    assert status == 400 and err["error"]["param"] == "text"
    status, err = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 400 and "embedding model" in err["error"]["message"]
    info = server.get_json("/get_model_info")
    assert info["is_generation"] is False and info["context_length"] == CONTEXT
    assert server.get_json("/v1/models")["data"][0]["id"] == "all-MiniLM-L6-v2"
    mem = server.get_json("/get_server_info")["memory_state"]
    assert mem["running"] == 0 and mem["waiting"] == 0
    server.assert_clean_log()
