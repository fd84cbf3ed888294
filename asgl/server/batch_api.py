"""OpenAI Batch API: POST/GET /v1/batches, GET /v1/batches/{id}, POST
/v1/batches/{id}/cancel, with the Files API (files_api.py) for input and output.

A batch is checked at creation: its input file exists with purpose "batch", its endpoint is
one of /v1/chat/completions, /v1/completions, /v1/embeddings, and every line is a request
to that endpoint with a unique custom_id. A file over MAX_BATCH_LINES is a 400; bad lines
make the batch `failed` with one error per line, as OpenAI reports them. Then
batch_runner.py runs it: validating -> in_progress -> finalizing -> completed (or
cancelling -> cancelled).
"""

from __future__ import annotations

import socket
from typing import Optional

from aiohttp import web

from asgl.config import EngineConfig
from asgl.server import files_api
from asgl.server.batch_runner import BatchRunner
from asgl.server.batch_store import ENDPOINTS, BatchStore, read_lines
from asgl.server.errors import ApiError, bad_request
from asgl.server.file_store import MAX_BATCH_LINES, FileStore
from asgl.server.jsonio import json_response
from asgl.server.state import STATE

RUNNER = web.AppKey("asgl_batches", BatchRunner)
MAX_METADATA_KEYS = 16


def create_batch_record(runner: BatchRunner, body: dict) -> dict:
    """Check a batch request (ApiError naming the field) and store the new batch."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
    window, metadata = body.get("completion_window", "24h"), body.get("metadata")
    if not isinstance(file_id, str):
        raise bad_request("input_file_id is required", "input_file_id")
    if endpoint not in ENDPOINTS:
        raise bad_request(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}",
                          "endpoint")
    if window != "24h":
        raise bad_request(f"completion_window must be '24h', got {window!r}",
                          "completion_window")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or len(metadata) > MAX_METADATA_KEYS):
        raise bad_request(f"metadata must be an object of at most {MAX_METADATA_KEYS} keys",
                          "metadata")
    info = files_api.get_file_or_404(runner.files, file_id)
    if info["purpose"] != "batch":
        raise bad_request(f"file {file_id} has purpose {info['purpose']!r}; a batch input "
                          "needs purpose 'batch'", "input_file_id")
    lines, errors = read_lines(runner.files, file_id, endpoint)
    if len(lines) + len(errors) > MAX_BATCH_LINES:
        raise bad_request(f"the input file has more than {MAX_BATCH_LINES} requests, the "
                          "limit per batch (MAX_BATCH_LINES)", "input_file_id")
    batch = runner.store.new(file_id, endpoint, window, metadata)
    batch["request_counts"]["total"] = len(lines)
    if errors:
        batch["status"], batch["failed_at"] = "failed", batch["created_at"]
        batch["errors"] = {"object": "list", "data": errors}
    runner.store.save(batch)
    return batch


async def create_batch(request: web.Request) -> web.Response:
    runner = request.app[RUNNER]
    try:
        body = await request.json()
    except ValueError:
        raise bad_request("the request body is not valid JSON") from None
    batch = create_batch_record(runner, body)
    if batch["status"] != "failed":
        runner.submit(batch["id"])
    return json_response(batch)


def _batch_or_404(runner: BatchRunner, batch_id: str) -> dict:
    batch = runner.store.get(batch_id)
    if batch is None:
        raise ApiError(404, f"no such batch: {batch_id!r}", "batch_id")
    return batch


async def retrieve_batch(request: web.Request) -> web.Response:
    return json_response(_batch_or_404(request.app[RUNNER], request.match_info["batch_id"]))


async def list_batches(request: web.Request) -> web.Response:
    page, has_more = files_api.paginate(request.app[RUNNER].store.list(), request,
                                        default_limit=20)
    return json_response({"object": "list", "data": page, "has_more": has_more,
                          "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None})


async def cancel_batch(request: web.Request) -> web.Response:
    runner = request.app[RUNNER]
    batch = _batch_or_404(runner, request.match_info["batch_id"])
    if batch["status"] not in ("validating", "in_progress", "finalizing", "cancelling"):
        raise ApiError(409, f"batch {batch['id']} is {batch['status']}: it cannot be "
                       "cancelled", "batch_id")
    return json_response(await runner.cancel(batch["id"]))


def add_routes(app: web.Application, config: EngineConfig) -> None:
    """The Files and Batch routes, their storage, and the runner's stop at cleanup (it is
    started by `start_runner` once the server listens)."""
    files = FileStore(config.file_storage_path)
    files_api.add_routes(app, files)
    # A CPU step's time grows with its rows (on a 2-core CPU, 2 batch lines kept online
    # TTFT within 2x of idle, 8 did not); a GPU decodes 32 rows nearly as fast as one.
    cap = config.max_batch_in_flight or (2 if _on_cpu(app[STATE]) else 32)
    runner = BatchRunner(files, BatchStore(files.root), cap,
                         api_key=config.api_key, draining=lambda: app[STATE].draining,
                         engine_requests=lambda: _engine_requests(app[STATE].engine))
    app[RUNNER] = runner
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", retrieve_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)

    async def stop_runner(app: web.Application) -> None:
        await runner.stop()

    app.on_cleanup.append(stop_runner)


def _on_cpu(state) -> bool:
    """ServerState.on_cpu, which falls back to --device when the engine has no runner (the
    data-parallel front), where "auto" means the GPU if there is one."""
    if getattr(state.engine, "runner", None) is None and state.config.device == "auto":
        import torch

        return not torch.cuda.is_available()
    return state.on_cpu


def _engine_requests(engine: object) -> int:
    """Requests in the engine (Engine keeps them in `_streams`, DPEngine in `_requests`, as
    launch.py's drain reads them; importing launch here would close an import cycle)."""
    table = getattr(engine, "_streams", None)
    if table is None:
        table = getattr(engine, "_requests", None) or {}
    return len(table)


async def start_runner(app: web.Application, sock: socket.socket) -> None:
    """Start running batches through the socket the server now listens on."""
    runner: Optional[BatchRunner] = app.get(RUNNER)
    if runner is None:
        return
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    await runner.start(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
