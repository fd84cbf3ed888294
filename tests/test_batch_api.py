"""The Files and Batch APIs (asgl/server/files_api.py, batch_api.py, batch_runner.py) driven
by the official `openai` client against `asgl serve` on the embedded models: a batch's
results equal (greedy) the same requests sent online, chat, completions and embeddings
lines; cancelling mid-run aborts the running lines; a restart mid-batch loses no finished
line; `asgl run-batch` writes what the online batch returns; limits and bad lines are
reported as OpenAI reports them.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from server_fixture import REPO, ServerProcess, free_port

openai = pytest.importorskip("openai")

QUESTIONS = ["Hello!", "What is 2+2?", "Name a color.", "Say yes.", "Count to three.",
             "What is the capital of France?"]


def _chat_line(i: int, max_tokens: int = 12) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "default", "max_tokens": max_tokens, "temperature": 0,
                     "messages": [{"role": "user",
                                   "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}]}}


def _jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _client(server: ServerProcess):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


def _upload(client, lines: list[dict], name: str = "in.jsonl"):
    return client.files.create(file=(name, io.BytesIO(_jsonl(lines))), purpose="batch")


def _wait(client, batch_id: str, until=("completed", "failed", "cancelled"),
          timeout: float = 240.0, seen: set | None = None):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if seen is not None:
            seen.add(batch.status)
        if batch.status in until or time.monotonic() > deadline:
            return batch
        time.sleep(0.1)


def _results(client, file_id: str) -> dict[str, dict]:
    text = client.files.content(file_id).text
    return {r["custom_id"]: r for r in map(json.loads, text.splitlines())}


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return str(tmp_path_factory.mktemp("batch-files"))


@pytest.fixture(scope="module")
def server(storage):
    proc = ServerProcess(["--file-storage-path", storage, "--max-batch-in-flight", "4"],
                         free_port())
    proc.wait_ready()
    yield proc
    proc.stop()


def test_batch_results_equal_online_requests(server):
    client = _client(server)
    lines = [_chat_line(i) for i in range(6)]
    uploaded = _upload(client, lines)
    assert uploaded.purpose == "batch" and uploaded.bytes == len(_jsonl(lines))
    assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
    assert uploaded.id in [f.id for f in client.files.list()]
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "test"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"run": "test"}
    seen: set = set()
    batch = _wait(client, batch.id, seen=seen)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 6 and batch.request_counts.completed == 6
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    results = _results(client, batch.output_file_id)
    assert sorted(results) == sorted(line["custom_id"] for line in lines)
    for line in lines:  # the same request sent online: the same greedy answer
        online = client.chat.completions.create(**line["body"])
        got = results[line["custom_id"]]["response"]
        assert got["status_code"] == 200
        assert got["body"]["choices"][0]["message"]["content"] == \
            online.choices[0].message.content
        assert got["body"]["usage"]["completion_tokens"] == online.usage.completion_tokens
    assert batch.id in [b.id for b in client.batches.list()]
    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_completions_batch_with_a_failing_line(server):
    client = _client(server)
    prompts = ["The sky is", "One, two,", "Paris is the capital of"]
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "default", "prompt": p, "max_tokens": 8, "temperature": 0}}
             for i, p in enumerate(prompts)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "default", "prompt": "x", "max_tokens": -3}})
    batch = client.batches.create(input_file_id=_upload(client, lines).id,
                                  endpoint="/v1/completions", completion_window="24h")
    batch = _wait(client, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 1)
    results = _results(client, batch.output_file_id)
    for line in lines[:3]:
        online = client.completions.create(**line["body"])
        assert results[line["custom_id"]]["response"]["body"]["choices"][0]["text"] == \
            online.choices[0].text
    errors = _results(client, batch.error_file_id)
    assert list(errors) == ["bad"]
    assert errors["bad"]["response"]["status_code"] == 400
    assert "max_tokens" in errors["bad"]["response"]["body"]["error"]["message"]


def test_bad_lines_fail_the_batch_and_limits_are_named(server):
    client = _client(server)
    raw = (json.dumps(_chat_line(0)) + "\nnot json\n"
           + json.dumps({**_chat_line(1), "url": "/v1/completions"}) + "\n"
           + json.dumps(_chat_line(0)) + "\n").encode()
    uploaded = client.files.create(file=("bad.jsonl", io.BytesIO(raw)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "failed" and batch.failed_at
    by_line = {e.line: e.message for e in batch.errors.data}
    assert set(by_line) == {2, 3, 4}
    assert "not valid JSON" in by_line[2] and "differs from the batch's endpoint" in by_line[3]
    assert "used twice" in by_line[4]
    too_many = b'{"custom_id": "x"}\n' * 50_001
    with pytest.raises(openai.BadRequestError, match="limit is 50000 lines per batch"):
        client.files.create(file=("big.jsonl", io.BytesIO(too_many)), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint must be one of"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses",
                              completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_doesnotexist")
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)  # failed already


def test_cancel_aborts_the_running_lines(server):
    client = _client(server)
    lines = [_chat_line(i, max_tokens=200) for i in range(24)]
    for line in lines:
        line["body"]["ignore_eos"] = True  # long lines: the cancel lands mid-run
    batch = client.batches.create(input_file_id=_upload(client, lines).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    _wait(client, batch.id, until=("in_progress",))
    deadline = time.monotonic() + 60
    while server.memory_state()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = _wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    assert batch.request_counts.completed < 24
    mem = server.wait_idle(timeout=10)  # the running lines were aborted, not run out
    assert mem["running"] == 0 and mem["waiting"] == 0
    done = batch.request_counts.completed
    if done:
        assert len(_results(client, batch.output_file_id)) == done


def test_restart_mid_batch_keeps_finished_lines(storage, tmp_path):
    """SIGTERM with --shutdown-timeout 0 mid-batch; the next start on the same storage
    resumes it: every line once, the ones finished before the stop unchanged."""
    args = ["--file-storage-path", str(tmp_path), "--max-batch-in-flight", "2",
            "--shutdown-timeout", "0"]
    first = ServerProcess(args, free_port())
    first.wait_ready()
    client = _client(first)
    lines = [_chat_line(i, max_tokens=16) for i in range(12)]
    batch = client.batches.create(input_file_id=_upload(client, lines).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 3 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.stop(signal.SIGTERM) == 0
    first.assert_clean_log()
    results_log = tmp_path / "batches" / f"{batch.id}.results.jsonl"
    before = {json.loads(x)["result"]["custom_id"]: json.loads(x)["result"]
              for x in results_log.read_text().splitlines()}
    assert 3 <= len(before) < 12
    assert json.loads((tmp_path / "batches" / f"{batch.id}.json").read_text())[
        "status"] == "in_progress"
    second = ServerProcess(args, free_port())
    try:
        second.wait_ready()
        client = _client(second)
        done = _wait(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 12
        second.assert_clean_log()
        results = _results(client, done.output_file_id)
        assert sorted(results) == sorted(line["custom_id"] for line in lines)
        for custom_id, result in before.items():
            assert results[custom_id] == result  # kept, not run again
        assert "resuming batch " + batch.id in second.log()
        for line in lines[:3]:
            online = client.chat.completions.create(**line["body"])
            assert results[line["custom_id"]]["response"]["body"]["choices"][0][
                "message"]["content"] == online.choices[0].message.content
    finally:
        second.stop()


def test_run_batch_equals_the_online_batch(server, tmp_path):
    client = _client(server)
    lines = [_chat_line(i) for i in range(4)]
    batch = client.batches.create(input_file_id=_upload(client, lines).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    online = _results(client, _wait(client, batch.id).output_file_id)
    (tmp_path / "in.jsonl").write_bytes(_jsonl(lines))
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "asgl.cli", "run-batch", "-i",
                           str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                           "--context-length", "1024", "--max-total-tokens", "16384",
                           "--random-seed", "0"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in offline] == [line["custom_id"] for line in lines]
    for result in offline:
        ours = result["response"]["body"]["choices"][0]["message"]
        theirs = online[result["custom_id"]]["response"]["body"]["choices"][0]["message"]
        assert ours == theirs


def test_embeddings_batch_on_an_embedding_server(tmp_path):
    server = ServerProcess(["--is-embedding", "--file-storage-path", str(tmp_path)],
                           free_port())
    try:
        server.wait_ready()
        client = _client(server)
        texts = ["a cat sat on the mat", "the stock market fell", "hello world"]
        lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "default", "input": t}} for i, t in enumerate(texts)]
        batch = client.batches.create(input_file_id=_upload(client, lines).id,
                                      endpoint="/v1/embeddings", completion_window="24h")
        batch = _wait(client, batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 3
        results = _results(client, batch.output_file_id)
        for line in lines:
            online = client.embeddings.create(**line["body"]).data[0].embedding
            got = results[line["custom_id"]]["response"]["body"]["data"][0]["embedding"]
            assert len(got) == len(online) == 384
            assert max(abs(a - b) for a, b in zip(got, online)) < 1e-5
    finally:
        server.stop()


def test_docs_example_runs(server):
    """docs/batch.md's Python example, as written but for the port."""
    import contextlib
    import re

    with open(os.path.join(REPO, "docs", "batch.md")) as f:
        code = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("http://127.0.0.1:30000", server.url), "docs/batch.md",
                     "exec"), {})
    printed = out.getvalue().splitlines()
    assert printed[0] == "BatchRequestCounts(completed=2, failed=0, total=2)"
    assert [line.split()[0] for line in printed[1:]] == ["q0", "q1"]
