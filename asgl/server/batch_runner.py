"""Runs /v1/batches: each line is sent to this server's own route over loopback HTTP, so a
batch line is validated, admitted and answered exactly as the same request sent online
(and `asgl run-batch` does the same through an app on a private port).

Online traffic is not starved: at most `--max-batch-in-flight` batch lines (over all
batches) are in the engine at once, so online requests always find room beside them, and
while online requests are in the engine no new batch line starts beyond one (their
prefills would share the online request's step); one always may, so a batch progresses
under any online load.

Durability: each finished line is appended to the batch's results log before it counts
(batch_store.py). On a restart, batches that were running are resumed and only their
unfinished lines run; a line cut off by the shutdown (its connection refused, or aborted
at `--shutdown-timeout`) is not recorded, so it runs again. Cancelling aborts the running
lines (their connections close, which aborts their engine requests) and finishes the batch
with the lines done so far.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Callable, Optional

import aiohttp

from asgl.server.batch_store import ACTIVE, BatchStore, Line, read_lines
from asgl.server.file_store import FileStore

logger = logging.getLogger(__name__)


class _Unfinished(Exception):
    """A line that did not run to its end because the server is stopping."""


class BatchRunner:
    def __init__(self, files: FileStore, store: BatchStore, max_in_flight: int,
                 api_key: Optional[str] = None,
                 draining: Callable[[], bool] = lambda: False,
                 engine_requests: Callable[[], int] = lambda: 0):
        self.files, self.store = files, store
        self.max_in_flight = max_in_flight
        self.api_key = api_key
        self.draining = draining
        self.engine_requests = engine_requests  # requests in the engine, batch lines too
        self.base_url: Optional[str] = None
        self._in_flight = 0
        self._slot_freed: Optional[asyncio.Event] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._runs: dict[str, asyncio.Task] = {}
        self._live: dict[str, dict] = {}  # the batch object a running _run saves
        self._cancelled: set[str] = set()
        self._stopping = False

    # ---------------------------------------------------------------- life cycle
    async def start(self, base_url: str) -> None:
        """Begin serving batches through `base_url` (this server); resume the ones that were
        running when the server last stopped."""
        self.base_url = base_url.rstrip("/")
        self._slot_freed = asyncio.Event()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        for batch in self.store.list():
            if batch["status"] in ACTIVE:
                logger.info("resuming batch %s (%s, %d of %d lines done)", batch["id"],
                            batch["status"], _done(batch), batch["request_counts"]["total"])
                self.submit(batch["id"])

    async def stop(self) -> None:
        """Stop running lines; the batches stay active on disk, to resume at the next start."""
        self._stopping = True
        runs = list(self._runs.values())
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def submit(self, batch_id: str) -> None:
        if self.base_url is None or batch_id in self._runs:
            return  # not serving yet: start() picks it up
        task = asyncio.get_running_loop().create_task(self._run(batch_id))
        self._runs[batch_id] = task
        task.add_done_callback(lambda _: self._runs.pop(batch_id, None))

    async def cancel(self, batch_id: str) -> dict:
        # the running batch's own object, so a line finishing now does not save it back
        batch = self._live.get(batch_id) or self.store.get(batch_id)
        if batch["status"] in ("validating", "in_progress", "finalizing"):
            batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
            self.store.save(batch)
            self._cancelled.add(batch_id)
            task = self._runs.get(batch_id)
            if task is not None:
                task.cancel()
            else:
                self.submit(batch_id)  # finishes it as cancelled
        return self.store.get(batch_id)

    async def wait(self, batch_id: str) -> dict:
        task = self._runs.get(batch_id)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        return self.store.get(batch_id)

    # ---------------------------------------------------------------- one batch
    async def _run(self, batch_id: str) -> None:
        batch = self.store.get(batch_id)
        lines, _ = read_lines(self.files, batch["input_file_id"], batch["endpoint"])
        done = self.store.results(batch_id)
        if batch["status"] == "validating":
            batch["status"], batch["in_progress_at"] = "in_progress", int(time.time())
        batch["request_counts"] = _counts(len(lines), done)
        self.store.save(batch)
        self._live[batch_id] = batch
        running: list[asyncio.Task] = []
        expired = False
        log = self.store.open_results(batch_id)
        try:
            if batch["status"] == "in_progress":
                for line in lines:
                    if line.index in done:
                        continue
                    await self._take_slot()
                    if self.draining():
                        self._release_slot()
                        break
                    if time.time() > batch["expires_at"]:  # the completion window is over
                        self._release_slot()
                        expired = True
                        break
                    task = asyncio.ensure_future(self._line(batch, line, done, log))
                    task.add_done_callback(lambda _: self._release_slot())
                    running.append(task)
                await asyncio.gather(*running)
        except asyncio.CancelledError:
            for task in running:
                task.cancel()  # closes its connection: the server aborts its request
            await asyncio.gather(*running, return_exceptions=True)
            if self._stopping and batch_id not in self._cancelled:
                return  # stays in_progress on disk: resumed at the next start
        finally:
            log.close()
            self._live.pop(batch_id, None)
        if self.draining() and batch_id not in self._cancelled:
            return
        self._finalize(batch_id, lines, expired)

    async def _take_slot(self) -> None:
        while True:
            online = self.engine_requests() > self._in_flight
            if self._in_flight < (1 if online else self.max_in_flight):
                self._in_flight += 1
                return
            self._slot_freed.clear()
            try:  # online requests come and go unannounced: look again soon
                await asyncio.wait_for(self._slot_freed.wait(), 0.02)
            except asyncio.TimeoutError:
                pass

    def _release_slot(self) -> None:
        self._in_flight -= 1
        self._slot_freed.set()

    async def _line(self, batch: dict, line: Line, done: dict, log) -> None:
        rid = f"batch_req_{uuid.uuid4().hex[:24]}"
        headers = {"X-Request-Id": rid, "Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            async with self._session.post(self.base_url + line.url, json=line.body,
                                          headers=headers) as r:
                raw = await r.read()
                status, request_id = r.status, r.headers.get("X-Request-Id", rid)
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": {"message": raw.decode(errors="replace")[:1000]}}
            if self.draining() and (status == 503 or _aborted(body)):
                raise _Unfinished
            result = {"id": rid, "custom_id": line.custom_id, "error": None,
                      "response": {"status_code": status, "request_id": request_id,
                                   "body": body}}
            ok = 200 <= status < 300
        except _Unfinished:
            return
        except aiohttp.ClientError as exc:
            if self.draining() or self._stopping:
                return
            result = {"id": rid, "custom_id": line.custom_id, "response": None,
                      "error": {"code": "connection_error", "message": str(exc)}}
            ok = False
        log.write(json.dumps({"line": line.index, "ok": ok, "result": result}) + "\n")
        log.flush()  # a finished line survives the process from here on
        done[line.index] = (ok, result)
        counts = batch["request_counts"]
        counts["completed" if ok else "failed"] += 1
        self.store.save(batch)

    def _finalize(self, batch_id: str, lines: list[Line], expired: bool = False) -> None:
        batch = self.store.get(batch_id)
        cancelled = batch_id in self._cancelled or batch["status"] == "cancelling"
        if not cancelled:
            batch["status"], batch["finalizing_at"] = "finalizing", int(time.time())
            self.store.save(batch)
        done = self.store.results(batch_id)
        ok = [done[i][1] for i in sorted(done) if done[i][0]]
        failed = [done[i][1] for i in sorted(done) if not done[i][0]]
        if expired and not cancelled:  # as OpenAI reports the lines a window left undone
            failed += [{"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": x.custom_id,
                        "response": None, "error": {
                            "code": "batch_expired", "message": "This request could not be "
                            "executed before the completion window expired."}}
                       for x in lines if x.index not in done]
        name = batch["id"]
        if ok:
            batch["output_file_id"] = self._write(f"{name}_output.jsonl", ok)
        if failed:
            batch["error_file_id"] = self._write(f"{name}_error.jsonl", failed)
        batch["request_counts"] = _counts(len(lines), done)
        now = int(time.time())
        if cancelled:
            batch["status"], batch["cancelled_at"] = "cancelled", now
        elif expired:
            batch["status"], batch["expired_at"] = "expired", now
        else:
            batch["status"], batch["completed_at"] = "completed", now
        self.store.save(batch)
        self._cancelled.discard(batch_id)
        logger.info("batch %s %s: %d succeeded, %d failed of %d", name, batch["status"],
                    len(ok), len(failed), len(lines))

    def _write(self, filename: str, results: list[dict]) -> str:
        data = "".join(json.dumps(r) + "\n" for r in results).encode()
        return self.files.create(data, filename, "batch_output")["id"]


def _aborted(body: dict) -> bool:
    choices = body.get("choices") if isinstance(body, dict) else None
    return bool(choices) and any(c.get("finish_reason") == "abort" for c in choices)


def _counts(total: int, done: dict) -> dict:
    ok = sum(1 for succeeded, _ in done.values() if succeeded)
    return {"total": total, "completed": ok, "failed": len(done) - ok}


def _done(batch: dict) -> int:
    counts = batch["request_counts"]
    return counts["completed"] + counts["failed"]
