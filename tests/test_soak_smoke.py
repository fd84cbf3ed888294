"""A few seconds of bench/soak.py against the shared test server: mixed traffic (streams,
n > 1, grammars, logprobs, aborts, hang-ups), then every check of the soak (no error, idle,
no KV slot leaked, fds back). RSS is left to the real soak (minutes, after a warm-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from server_fixture import REPO, main_server  # noqa: F401


def test_soak_smoke(main_server, tmp_path):  # noqa: F811
    out = tmp_path / "soak.json"
    cmd = [sys.executable, os.path.join(REPO, "bench", "soak.py"), "--url", main_server.url,
           "--pid", str(main_server.proc.pid), "--seconds", "4", "--concurrency", "3",
           "--sample-every", "2", "--max-tokens", "8", "--rss-tolerance", "10",
           "--fd-slack", "8", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["errors"] == 0 and result["requests"] > 0
    assert len(result["by_kind"]) >= 3  # a mix, not one kind
    assert result["timeline"] and "rss_mb" in result["timeline"][0]
