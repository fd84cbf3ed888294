"""The Files API and the batch store without an engine (fast): the upload size limit named
in its error, the line-count limit, batch input checks, and a results log that survives a
torn last line (a crash mid-write) with the torn line run again."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from asgl.server import file_store, files_api
from asgl.server.batch_store import BatchStore, read_lines
from asgl.server.file_store import FileStore
from asgl.server.middleware import error_middleware


def _run(coro_fn, store: FileStore):
    async def main():
        app = web.Application(middlewares=[error_middleware])
        files_api.add_routes(app, store)
        async with TestClient(TestServer(app)) as client:
            return await coro_fn(client)
    return asyncio.run(main())


def _form(data: bytes, purpose: str = "batch") -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("purpose", purpose)
    form.add_field("file", data, filename="in.jsonl")
    return form


def test_upload_limits_are_named(tmp_path, monkeypatch):
    store = FileStore(str(tmp_path))
    monkeypatch.setattr(files_api, "MAX_UPLOAD_BYTES", 1000)
    monkeypatch.setattr(files_api, "MAX_BATCH_LINES", 3)

    async def go(client):
        big = await client.post("/v1/files", data=_form(b"x" * 1001))
        many = await client.post("/v1/files", data=_form(b"{}\n" * 4))
        ok = await client.post("/v1/files", data=_form(b"{}\n" * 3))
        bad_purpose = await client.post("/v1/files", data=_form(b"{}\n", "nope"))
        return ([(r.status, await r.json()) for r in (big, many, bad_purpose)],
                await ok.json())

    (big, many, bad_purpose), ok = _run(go, store)
    assert big[0] == 413 and "upload limit of 1000 bytes (MAX_UPLOAD_BYTES" in \
        big[1]["error"]["message"]
    assert many[0] == 400 and "has 4 requests; the limit is 3 lines per batch " \
        "(MAX_BATCH_LINES)" in many[1]["error"]["message"]
    assert bad_purpose[0] == 400 and bad_purpose[1]["error"]["param"] == "purpose"
    assert ok["bytes"] == 9 and ok["purpose"] == "batch"
    # refused uploads leave nothing behind; the accepted one is listed after a "restart"
    assert [f["id"] for f in FileStore(str(tmp_path)).list()] == [ok["id"]]
    assert not list((tmp_path / "files").glob(".*"))


def test_read_lines_reports_each_bad_line(tmp_path):
    store = FileStore(str(tmp_path))
    good = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"prompt": "x"}}
    raw = "\n".join([json.dumps(good), "[1]", json.dumps({**good, "custom_id": ""}),
                     json.dumps({**good, "custom_id": "b", "method": "GET"}),
                     json.dumps({**good, "custom_id": "c", "body": {"stream": True}}),
                     "", json.dumps({**good, "custom_id": "d"})]) + "\n"
    file_id = store.create(raw.encode(), "in.jsonl", "batch")["id"]
    lines, errors = read_lines(store, file_id, "/v1/completions")
    assert [(x.index, x.custom_id) for x in lines] == [(0, "a"), (1, "d")]
    assert [(e["line"], e["param"]) for e in errors] == [
        (2, None), (3, "custom_id"), (4, "method"), (5, "body.stream")]
    empty = store.create(b"\n\n", "e.jsonl", "batch")["id"]
    assert read_lines(store, empty, "/v1/completions")[1][0]["code"] == "empty_file"


def test_results_log_survives_a_torn_line(tmp_path):
    batches = BatchStore(tmp_path)
    with batches.open_results("batch_x1") as log:
        log.write(json.dumps({"line": 0, "ok": True, "result": {"custom_id": "a"}}) + "\n")
        log.write('{"line": 1, "ok": tru')  # the process died mid-write
    assert list(batches.results("batch_x1")) == [0]  # line 1 runs again
    with batches.open_results("batch_x1") as log:
        log.write(json.dumps({"line": 1, "ok": False, "result": {"custom_id": "b"}}) + "\n")
    assert batches.results("batch_x1") == {0: (True, {"custom_id": "a"}),
                                           1: (False, {"custom_id": "b"})}


def test_default_storage_follows_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ASGL_CACHE_DIR", str(tmp_path))
    assert file_store.default_root() == tmp_path / "files"
    store = FileStore()
    assert store.dir == tmp_path / "files" / "files" and BatchStore(store.root).dir == \
        tmp_path / "files" / "batches"


# ------------------------------------------------------------------ the runner, on a stub
class _Stub:
    """A chat route that echoes the user's text after a short wait, counting how many
    requests it holds at once."""

    def __init__(self):
        self.now = self.most = 0

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0.02)
        finally:
            self.now -= 1
        text = body["messages"][0]["content"]
        return web.json_response({"choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant",
                                                           "content": text.upper()}}]})


def _run_batch(tmp_path, n: int, cap: int, online: bool = False, expired: bool = False):
    from asgl.server.batch_api import create_batch_record
    from asgl.server.batch_runner import BatchRunner

    stub = _Stub()
    files = FileStore(str(tmp_path))
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": f"line {i}"}]}}
             for i in range(n)]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    file_id = files.create(data, "in.jsonl", "batch")["id"]

    async def main():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", stub.chat)
        async with TestServer(app) as server:
            runner = BatchRunner(files, BatchStore(files.root), cap)
            if online:  # an online request is always in the engine besides the lines
                runner.engine_requests = lambda: runner._in_flight + 1
            batch = create_batch_record(runner, {"input_file_id": file_id,
                                                 "endpoint": "/v1/chat/completions"})
            if expired:
                batch["expires_at"] = int(time.time()) - 1
                runner.store.save(batch)
            await runner.start(str(server.make_url("")))
            done = await runner.wait(batch["id"])
            await runner.stop()
            return done

    batch = asyncio.run(main())
    return batch, files, stub


def _content(files: FileStore, file_id: str) -> list[dict]:
    return [json.loads(x) for x in files.lines(file_id)]


def test_runner_caps_lines_in_flight_and_keeps_input_order(tmp_path):
    batch, files, stub = _run_batch(tmp_path, 12, cap=3)
    assert batch["status"] == "completed" and batch["request_counts"] == {
        "total": 12, "completed": 12, "failed": 0}
    assert stub.most == 3
    out = _content(files, batch["output_file_id"])
    assert [r["custom_id"] for r in out] == [f"c{i}" for i in range(12)]
    assert out[5]["response"]["body"]["choices"][0]["message"]["content"] == "LINE 5"
    assert all(batch[k] for k in ("in_progress_at", "finalizing_at", "completed_at"))


def test_runner_starts_one_line_at_a_time_while_online_requests_run(tmp_path):
    batch, _, stub = _run_batch(tmp_path, 6, cap=4, online=True)
    assert batch["status"] == "completed" and stub.most == 1


def test_runner_expires_a_batch_past_its_window(tmp_path):
    batch, files, stub = _run_batch(tmp_path, 3, cap=2, expired=True)
    assert batch["status"] == "expired" and batch["expired_at"]
    assert stub.most == 0 and batch["output_file_id"] is None
    errors = _content(files, batch["error_file_id"])
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("c0", "batch_expired"), ("c1", "batch_expired"), ("c2", "batch_expired")]
