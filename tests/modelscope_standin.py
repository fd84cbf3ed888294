"""A local stand-in of ModelScope's HTTP API (`MODELSCOPE_ENDPOINT`), for tests without the
internet: the real `modelscope` client's `snapshot_download` runs against it.

It answers the file listing (`GET /api/v1/models/ORG/NAME/repo/files?Revision=..`), the
file download (`GET /api/v1/models/ORG/NAME/repo?Revision=..&FilePath=..`) and what else
the client asks (revisions), in ModelScope's `{"Code", "Data"}` envelope. Repos are the
same `Repo`/`Revision` tables as hub_standin.py's; every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

from hub_standin import Repo


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StandinModelScope:
    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "StandinModelScope":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type:
        ms = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._route(head=True)

            def do_GET(self) -> None:
                self._route(head=False)

            def _route(self, head: bool) -> None:
                ms.requests.append(f"{self.command} {self.path}")
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                m = re.match(r"^/api/v1/models/([^/]+/[^/]+)(/.*)?$", unquote(url.path))
                if not m:
                    return self._json(404, {"Code": 404, "Message": "no such route"})
                repo = ms.repos.get(m[1])
                if repo is None:
                    return self._json(404, {"Code": 10010205001,
                                            "Message": f"model {m[1]} not found"})
                rest = m[2] or ""
                if rest == "/revisions":
                    names = [{"Revision": r, "CreatedAt": 1} for r in repo.revisions]
                    return self._json(200, {"Code": 200, "Data": {"RevisionMap": {
                        "Branches": names, "Tags": []}}})
                rev = query.get("Revision", "master")
                found = repo.find("main" if rev == "master" else rev)
                if found is None:
                    return self._json(404, {"Code": 404,
                                            "Message": f"revision {rev} not found"})
                if rest == "/repo/files":
                    files = [{"Name": os.path.basename(p), "Path": p, "Type": "blob",
                              "Size": os.path.getsize(f), "Sha256": _sha256(f),
                              "Revision": found.commit}
                             for p, f in sorted(found.files.items())]
                    return self._json(200, {"Code": 200, "Data": {"Files": files}})
                if rest == "/repo" and "FilePath" in query:
                    local = found.files.get(query["FilePath"])
                    if local is None:
                        return self._json(404, {"Code": 404, "Message": "no such file"})
                    return self._file(local, head)
                if rest == "":
                    return self._json(200, {"Code": 200, "Data": {"Id": m[1], "Path": m[1]}})
                self._json(404, {"Code": 404, "Message": f"unanswered: {rest}"})

            def _file(self, local: str, head: bool) -> None:
                size = os.path.getsize(local)
                start, status = 0, 200
                rng = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if rng and not head:
                    start, status = int(rng[1]), 206
                self.send_response(status)
                self.send_header("Content-Length", str(size - start))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                self.end_headers()
                if not head:
                    with open(local, "rb") as f:
                        f.seek(start)
                        self.wfile.write(f.read())

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler
