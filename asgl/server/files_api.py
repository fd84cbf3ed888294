"""OpenAI Files API: POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET
/v1/files/{id}/content. The bytes live in a `FileStore` (file_store.py).

An upload is streamed to disk (never whole in memory) and refused past MAX_UPLOAD_BYTES; a
`purpose: "batch"` upload past MAX_BATCH_LINES lines is refused too, each error naming its
limit.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from asgl.server.errors import ApiError, bad_request
from asgl.server.file_store import MAX_BATCH_LINES, MAX_UPLOAD_BYTES, PURPOSES, FileStore
from asgl.server.jsonio import json_response

FILES = web.AppKey("asgl_files", FileStore)


def get_file_or_404(store: FileStore, file_id: str) -> dict:
    obj = store.get(file_id)
    if obj is None:
        raise ApiError(404, f"no such file: {file_id!r}", "file_id")
    return obj


async def upload_file(request: web.Request) -> web.Response:
    store = request.app[FILES]
    if not request.content_type.startswith("multipart/"):
        raise bad_request("send the file as multipart/form-data with fields 'file' and "
                          "'purpose'", "file")
    reader = await request.multipart()
    purpose, filename, file_id, tmp = None, None, None, None
    try:
        while (part := await reader.next()) is not None:
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or "upload.jsonl"
                file_id, tmp = store.new_upload()
                await _stream_to(part, tmp)
        if tmp is None:
            raise bad_request("the form has no 'file' field", "file")
        if purpose not in PURPOSES:
            raise bad_request(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}",
                              "purpose")
        if purpose == "batch":
            _check_line_count(tmp)
        obj = store.commit(file_id, tmp, filename, purpose)
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return json_response(obj)


async def _stream_to(part, tmp: Path) -> None:
    size = 0
    with open(tmp, "wb") as f:
        while chunk := await part.read_chunk(1 << 20):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                raise ApiError(413, f"the file is larger than the upload limit of "
                               f"{MAX_UPLOAD_BYTES} bytes (MAX_UPLOAD_BYTES, as OpenAI's "
                               "200 MB for batch input)", "file")
            f.write(chunk)


def _check_line_count(path: Path) -> None:
    with open(path, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    if lines > MAX_BATCH_LINES:
        raise bad_request(f"the batch input file has {lines} requests; the limit is "
                          f"{MAX_BATCH_LINES} lines per batch (MAX_BATCH_LINES)", "file")


async def list_files(request: web.Request) -> web.Response:
    store = request.app[FILES]
    files = store.list(request.query.get("purpose"))
    page, has_more = paginate(files, request)
    return json_response({"object": "list", "data": page, "has_more": has_more,
                          "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None})


def paginate(items: list[dict], request: web.Request, default_limit: int = 10000
             ) -> tuple[list[dict], bool]:
    """OpenAI's cursor pages: `after` (an id) and `limit` (1..10000); `order=asc` reverses
    the newest-first order."""
    if request.query.get("order") == "asc":
        items = items[::-1]
    after = request.query.get("after")
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    try:
        limit = int(request.query.get("limit", default_limit))
    except ValueError:
        raise bad_request("limit must be an integer", "limit") from None
    if not 1 <= limit <= 10000:
        raise bad_request(f"limit must be in 1..10000, got {limit}", "limit")
    return items[:limit], len(items) > limit


async def retrieve_file(request: web.Request) -> web.Response:
    return json_response(get_file_or_404(request.app[FILES], request.match_info["file_id"]))


async def file_content(request: web.Request) -> web.StreamResponse:
    store = request.app[FILES]
    file_id = request.match_info["file_id"]
    get_file_or_404(store, file_id)
    return web.FileResponse(store.data_path(file_id),
                            headers={"Content-Type": "application/octet-stream"})


async def delete_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    if not request.app[FILES].delete(file_id):
        raise ApiError(404, f"no such file: {file_id!r}", "file_id")
    return json_response({"id": file_id, "object": "file", "deleted": True})


def add_routes(app: web.Application, store: FileStore) -> None:
    app[FILES] = store
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", retrieve_file)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
