"""The Files API and the batch store without an engine (fast): the upload size limit named
in its error, the line-count limit, batch input checks, and a results log that survives a
torn last line (a crash mid-write) with the torn line run again."""

from __future__ import annotations

import asyncio
import json

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
