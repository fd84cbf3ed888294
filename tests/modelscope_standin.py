"""A local stand-in of ModelScope's HTTP API (`MODELSCOPE_ENDPOINT`), for tests without the
internet: the real `modelscope` client's `snapshot_download` runs against it.

It answers the file listing (`GET /api/v1/models/ORG/NAME/repo/files?Revision=..`), the
file download (`GET /api/v1/models/ORG/NAME/repo?Revision=..&FilePath=..`) and what else
the client asks (revisions), in ModelScope's `{"Code", "Data"}` envelope. Repos are the
same `Repo`/`Revision` tables as hub_standin.py's; every request is recorded.
"""

from __future__ import annotations

import json
import os
import re
from urllib.parse import parse_qs, unquote, urlparse

from hub_standin import Repo, RoutedHandler, StandinServer, file_sha256


class StandinModelScope(StandinServer):
    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        super().__init__()

    def _handler(self) -> type:
        ms = self

        class Handler(RoutedHandler):
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
                              "Size": os.path.getsize(f), "Sha256": file_sha256(f),
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
                self._send(status, json.dumps(body).encode(), "application/json")

        return Handler
