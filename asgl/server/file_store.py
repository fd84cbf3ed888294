"""Files of the OpenAI Files API on disk, under `--file-storage-path` (default: the user's
cache dir, `~/.cache/asgl/files`, or `$ASGL_CACHE_DIR/files`), so they survive a restart.

Each file is two entries in `<root>/files/`: `<id>.data` (the bytes) and `<id>.json` (its
OpenAI File object). The data is written under a temporary name and renamed, then the
object: a file listed is whole. Batch state lives beside, in `<root>/batches/` (see
batch_store.py).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

# OpenAI's limits for batch input files (200 MB, 50,000 requests), ours for every upload
MAX_UPLOAD_BYTES = 200 * 1000 * 1000
MAX_BATCH_LINES = 50_000
PURPOSES = ("batch", "batch_output", "fine-tune", "assistants", "vision", "user_data", "evals")


def default_root() -> Path:
    return Path(os.environ.get("ASGL_CACHE_DIR") or Path.home() / ".cache" / "asgl") / "files"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class FileStore:
    def __init__(self, root: Optional[str] = None):
        self.root = Path(os.path.expanduser(root)) if root else default_root()
        self.dir = self.root / "files"
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp"):  # an upload cut off by a crash
            stale.unlink(missing_ok=True)

    def data_path(self, file_id: str) -> Path:
        return self.dir / f"{file_id}.data"

    def new_upload(self) -> tuple[str, Path]:
        """A fresh id and the temporary path to write its bytes to (then `commit`)."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        return file_id, self.dir / f".{file_id}.upload.tmp"

    def commit(self, file_id: str, tmp: Path, filename: str, purpose: str) -> dict:
        os.replace(tmp, self.data_path(file_id))
        obj = {"id": file_id, "object": "file", "bytes": self.data_path(file_id).stat().st_size,
               "created_at": int(time.time()), "filename": filename, "purpose": purpose,
               "status": "processed", "status_details": None, "expires_at": None}
        write_json_atomic(self.dir / f"{file_id}.json", obj)
        return obj

    def create(self, data: bytes, filename: str, purpose: str) -> dict:
        file_id, tmp = self.new_upload()
        tmp.write_bytes(data)
        return self.commit(file_id, tmp, filename, purpose)

    def get(self, file_id: str) -> Optional[dict]:
        if not _plain_id(file_id):
            return None
        try:
            return json.loads((self.dir / f"{file_id}.json").read_text())
        except (OSError, ValueError):
            return None

    def list(self, purpose: Optional[str] = None) -> list[dict]:
        """Newest first, as OpenAI lists them."""
        found = [self.get(p.stem) for p in self.dir.glob("file-*.json")]
        files = [f for f in found if f and (purpose is None or f["purpose"] == purpose)]
        return sorted(files, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    def delete(self, file_id: str) -> bool:
        if self.get(file_id) is None:
            return False
        (self.dir / f"{file_id}.json").unlink(missing_ok=True)
        self.data_path(file_id).unlink(missing_ok=True)
        return True

    def lines(self, file_id: str) -> Iterator[bytes]:
        with open(self.data_path(file_id), "rb") as f:
            yield from f


def _plain_id(file_id: str) -> bool:
    # ids become file names: nothing that could leave the directory
    return file_id.startswith("file-") and file_id[5:].isalnum()
