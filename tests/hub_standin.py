"""A local stand-in of the Hugging Face hub's HTTP API, for tests that must not reach the
internet: the real `huggingface_hub` client runs against it end to end (`HF_ENDPOINT`).

It answers what `snapshot_download` / `hf_hub_download` call:
- `GET /api/models/ORG/NAME/revision/REV` (repo info: the commit sha, the file list),
- `GET /api/models/ORG/NAME/tree/REV?recursive=...` (the file tree),
- `HEAD|GET /ORG/NAME/resolve/REV/PATH` (a file, with `X-Repo-Commit`, `ETag`, sizes and
  `Range` support, so an interrupted download resumes),
and the hub's error shapes (`X-Error-Code`: RepoNotFound, RevisionNotFound, GatedRepo,
EntryNotFound), so the client raises the same exception types as against the real hub.
Every request is recorded in `requests` ("METHOD path"); `cut` breaks a file's first
download off midway, to check that the client resumes it (with a Range request).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlparse


@dataclass
class Revision:
    commit: str                      # 40 hex digits
    files: dict[str, str]            # path in repo -> local file


@dataclass
class Repo:
    revisions: dict[str, Revision] = field(default_factory=dict)  # branch/tag -> revision
    gated_token: Optional[str] = None   # gated: only this bearer token may read it

    def find(self, rev: str) -> Optional[Revision]:
        if rev in self.revisions:
            return self.revisions[rev]
        return next((r for r in self.revisions.values() if r.commit == rev), None)


def commit_sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StandinServer:
    """A stand-in API (this one's and modelscope_standin.py's): `with Server(...) as s:`
    serves on 127.0.0.1:<free port> from a daemon thread, at `s.url`; every request is
    recorded in `requests` ("METHOD path"). Subclasses give `_handler()`, a `RoutedHandler`."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler(self) -> type:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


class RoutedHandler(BaseHTTPRequestHandler):
    """HTTP/1.1, quiet; GET and HEAD both go to `_route(head)`."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        raise NotImplementedError

    def _send(self, status: int, body: bytes, ctype: str,
              headers: tuple[tuple[str, str], ...] = ()) -> None:
        """A whole response (its body left out for HEAD)."""
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class StandinHub(StandinServer):
    """`with StandinHub(repos) as hub:` serves on 127.0.0.1:<free port>; `hub.url`."""

    def __init__(self, repos: dict[str, Repo], cut: Optional[dict[str, int]] = None):
        self.repos = repos
        # path in repo -> bytes: the first GET of that file breaks off after so many bytes
        self.cut = dict(cut or {})
        self.ranges: list[tuple[str, int]] = []  # (path, first byte) of each Range request
        self._digests: dict[str, str] = {}
        super().__init__()

    def digest(self, path: str) -> str:
        if path not in self._digests:
            self._digests[path] = file_sha256(path)
        return self._digests[path]

    def _handler(self) -> type:
        hub = self

        class Handler(RoutedHandler):
            def _route(self, head: bool) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                path = unquote(urlparse(self.path).path)
                m = re.match(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/(.*))?$",
                             path)
                if m:
                    return self._api(m[1], m[2], m[3])
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if m:
                    return self._file(m[1], m[2], m[3], head)
                self._error(404, "EntryNotFound", "no such route")

            def _lookup(self, repo_id: str, rev: str) -> Optional[Revision]:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(401, "RepoNotFound", "Repository not found")
                    return None
                if repo.gated_token is not None and \
                        self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
                    self._error(401 if not self.headers.get("Authorization") else 403,
                                "GatedRepo", "Access to this model is restricted")
                    return None
                found = repo.find(rev)
                if found is None:
                    self._error(404, "RevisionNotFound", "Invalid rev id")
                return found

            def _api(self, repo_id: str, kind: str, rev: str) -> None:
                found = self._lookup(repo_id, rev)
                if found is None:
                    return
                if kind == "revision":
                    body = {"id": repo_id, "modelId": repo_id, "sha": found.commit,
                            "private": False, "gated": False, "disabled": False,
                            "siblings": [{"rfilename": p} for p in sorted(found.files)]}
                else:
                    body = [{"type": "file", "path": p, "size": os.path.getsize(f),
                             "oid": hashlib.sha1(p.encode() + found.commit.encode()).hexdigest(),
                             "lfs": {"oid": hub.digest(f), "size": os.path.getsize(f),
                                     "pointerSize": 134}}
                            for p, f in sorted(found.files.items())]
                self._send(200, json.dumps(body).encode(), "application/json")

            def _file(self, repo_id: str, rev: str, rel: str, head: bool) -> None:
                found = self._lookup(repo_id, rev)
                if found is None:
                    return
                local = found.files.get(rel)
                if local is None:
                    return self._error(404, "EntryNotFound", f"{rel} not in {repo_id}")
                size = os.path.getsize(local)
                start, status = 0, 200
                rng = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
                if rng and not head:
                    start, status = int(rng[1]), 206
                    hub.ranges.append((rel, start))
                    if rng[2]:  # bytes=a-b: this stand-in serves ranges to the file's end
                        assert int(rng[2]) == size - 1, self.headers["Range"]
                self.send_response(status)
                self.send_header("X-Repo-Commit", found.commit)
                self.send_header("ETag", f'"{hub.digest(local)}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(size - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                self.end_headers()
                if head:
                    return
                with open(local, "rb") as f:
                    f.seek(start)
                    if rel in hub.cut:  # a connection lost mid-file, once
                        self.wfile.write(f.read(hub.cut.pop(rel)))
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    for block in iter(lambda: f.read(1 << 20), b""):
                        self.wfile.write(block)

            def _error(self, status: int, code: str, message: str) -> None:
                self._send(status, json.dumps({"error": message}).encode(), "application/json",
                           (("X-Error-Code", code), ("X-Error-Message", message)))

        return Handler
