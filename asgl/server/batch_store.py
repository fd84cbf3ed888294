"""Batches on disk, beside the files (file_store.py): `<root>/batches/<id>.json` is the
OpenAI Batch object, `<id>.results.jsonl` the finished lines, appended (and flushed) as each
line finishes, so a restart knows which lines are done and runs only the others.

Also the reading of a batch input file: its lines, checked as OpenAI checks them.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from asgl.server.file_store import FileStore, write_json_atomic

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# statuses in which the runner still owns the batch (resumed after a restart)
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
MAX_REPORTED_ERRORS = 100


@dataclass
class Line:
    index: int        # 0-based position in the input file
    custom_id: str
    url: str
    body: dict


def read_lines(files: FileStore, file_id: str, endpoint: str) -> tuple[list[Line], list[dict]]:
    """The requests of a batch input file and, for lines that are not valid requests, the
    OpenAI batch errors (`code`, `message`, `line` 1-based)."""
    lines, errors, seen = [], [], set()

    def error(number: int, message: str, param: Optional[str] = None) -> None:
        if len(errors) < MAX_REPORTED_ERRORS:
            errors.append({"code": "invalid_request", "message": message, "param": param,
                           "line": number})

    for number, raw in enumerate(files.lines(file_id), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            error(number, f"not valid JSON: {exc}")
            continue
        if not isinstance(obj, dict):
            error(number, "a line must be a JSON object")
            continue
        custom_id, url, body = obj.get("custom_id"), obj.get("url"), obj.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            error(number, "custom_id must be a non-empty string", "custom_id")
        elif custom_id in seen:
            error(number, f"custom_id {custom_id!r} is used twice; each must be unique",
                  "custom_id")
        elif obj.get("method", "POST") != "POST":
            error(number, "method must be POST", "method")
        elif url != endpoint:
            error(number, f"url {url!r} differs from the batch's endpoint {endpoint!r}", "url")
        elif not isinstance(body, dict):
            error(number, "body must be a JSON object", "body")
        elif body.get("stream"):
            error(number, "stream is not supported in a batch", "body.stream")
        else:
            seen.add(custom_id)
            lines.append(Line(len(lines), custom_id, url, body))
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "the input file has no requests",
                       "param": None, "line": None})
    return lines, errors


class BatchStore:
    def __init__(self, root: Path):
        self.dir = root / "batches"
        self.dir.mkdir(parents=True, exist_ok=True)

    def new(self, input_file_id: str, endpoint: str, window: str,
            metadata: Optional[dict]) -> dict:
        now = int(time.time())
        return {"id": f"batch_{uuid.uuid4().hex[:24]}", "object": "batch",
                "endpoint": endpoint, "errors": None, "input_file_id": input_file_id,
                "completion_window": window, "status": "validating",
                "output_file_id": None, "error_file_id": None, "created_at": now,
                "in_progress_at": None, "expires_at": now + 24 * 3600, "finalizing_at": None,
                "completed_at": None, "failed_at": None, "expired_at": None,
                "cancelling_at": None, "cancelled_at": None,
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "metadata": metadata}

    def save(self, batch: dict) -> None:
        write_json_atomic(self.dir / f"{batch['id']}.json", batch)

    def get(self, batch_id: str) -> Optional[dict]:
        if not (batch_id.startswith("batch_") and batch_id[6:].isalnum()):
            return None
        try:
            return json.loads((self.dir / f"{batch_id}.json").read_text())
        except (OSError, ValueError):
            return None

    def list(self) -> list[dict]:
        found = [self.get(p.stem) for p in self.dir.glob("batch_*.json")]
        return sorted((b for b in found if b), key=lambda b: (b["created_at"], b["id"]),
                      reverse=True)

    # ---------------------------------------------------------------- finished lines
    def results_path(self, batch_id: str) -> Path:
        return self.dir / f"{batch_id}.results.jsonl"

    def results(self, batch_id: str) -> dict[int, tuple[bool, dict]]:
        """line index -> (succeeded, output line); a torn last line (a crash mid-write) is
        skipped, and that line runs again."""
        done: dict[int, tuple[bool, dict]] = {}
        try:
            with open(self.results_path(batch_id), "rb") as f:
                for raw in f:
                    try:
                        entry = json.loads(raw)
                    except ValueError:
                        continue
                    done[entry["line"]] = (entry["ok"], entry["result"])
        except FileNotFoundError:
            pass
        return done

    def open_results(self, batch_id: str) -> Any:
        path = self.results_path(batch_id)
        f = open(path, "a", encoding="utf-8")
        if f.tell() > 0:
            with open(path, "rb") as check:
                check.seek(-1, 2)
                if check.read(1) != b"\n":  # a torn line: end it, so the next one is whole
                    f.write("\n")
        return f
