"""`asgl run-batch -i in.jsonl -o out.jsonl`: a batch file run offline, as `vllm run-batch`.

The engine starts in this process with the serve flags; the batch runs through the same
routes and runner as /v1/batches (served on a private 127.0.0.1 port that nothing else is
told of), so each output line equals what the online Batch API returns for it. The output
file holds every line in input order, failed ones with their error response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile

from asgl.config import EngineConfig

logger = logging.getLogger(__name__)


def run_batch(cfg: EngineConfig, input_path: str, output_path: str) -> int:
    """Returns the exit status: 0 when every line succeeded, 1 when some failed, 2 when
    the input file is not a valid batch."""
    with open(os.path.expanduser(input_path), "rb") as f:
        data = f.read()
    first = next((line for line in data.splitlines() if line.strip()), b"{}")
    try:
        endpoint = json.loads(first).get("url", "/v1/chat/completions")
    except (ValueError, AttributeError):
        endpoint = "/v1/chat/completions"  # the line's own error is reported below
    with tempfile.TemporaryDirectory(prefix="asgl-run-batch-") as storage:
        # nothing runs beside it: as many lines at once as the engine takes
        cfg = cfg.replace(file_storage_path=storage, api_key=None,
                          max_batch_in_flight=cfg.max_running_requests or 256)
        return asyncio.run(_run(cfg,
                                data, os.path.basename(input_path), endpoint, output_path))


async def _run(cfg: EngineConfig, data: bytes, name: str, endpoint: str, output: str) -> int:
    from aiohttp import web
    from tqdm import tqdm

    from asgl.engine.loop.engine import Engine
    from asgl.server.app import build_app
    from asgl.server.batch_api import RUNNER, create_batch_record, start_runner
    from asgl.server.errors import ApiError
    from asgl.server.launch import bind_socket

    async with Engine(cfg) as engine:
        app = build_app(engine, cfg)
        runner = app[RUNNER]
        file_id = runner.files.create(data, name, "batch")["id"]
        try:
            batch = create_batch_record(runner, {"input_file_id": file_id,
                                                 "endpoint": endpoint})
        except ApiError as exc:
            print(f"asgl run-batch: error: {exc.message}", file=sys.stderr)
            return 2
        if batch["status"] == "failed":
            for err in batch["errors"]["data"]:
                print(f"asgl run-batch: line {err['line']}: {err['message']}", file=sys.stderr)
            return 2
        site_runner = web.AppRunner(app)
        await site_runner.setup()
        sock = bind_socket("127.0.0.1", 0)
        try:
            await web.SockSite(site_runner, sock).start()
            await start_runner(app, sock)  # runs the new batch (it is active on disk)
            total = batch["request_counts"]["total"]
            with tqdm(total=total, desc="run-batch", unit="line") as bar:
                waiting = asyncio.ensure_future(runner.wait(batch["id"]))
                while not waiting.done():
                    await asyncio.wait([waiting], timeout=0.5)
                    counts = runner.store.get(batch["id"])["request_counts"]
                    bar.update(counts["completed"] + counts["failed"] - bar.n)
            batch = waiting.result()
            results = runner.store.results(batch["id"])
        finally:
            await site_runner.cleanup()
    with open(os.path.expanduser(output), "w", encoding="utf-8") as f:
        for index in sorted(results):
            f.write(json.dumps(results[index][1]) + "\n")
    counts = batch["request_counts"]
    logger.warning("run-batch: %d of %d lines succeeded, %d failed; written to %s",
                   counts["completed"], counts["total"], counts["failed"], output)
    return 0 if counts["failed"] == 0 else 1
