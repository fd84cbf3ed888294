"""What a new user checks first on a live `asgl serve`: the model's card under the names
it answers to, a complete /get_server_info, and the benchmarks installed with the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error

import pytest

from server_fixture import REPO, ServerProcess, main_server  # noqa: F401


def test_model_card_answers_for_its_id_and_aliases(main_server: ServerProcess):
    served = main_server.get_json("/v1/models")["data"][0]
    for name in (served["id"], "default"):
        card = main_server.get_json(f"/v1/models/{name}")
        assert card["id"] == served["id"] and card["object"] == "model", card
        assert card["max_model_len"] == served["max_model_len"]
    with pytest.raises(urllib.error.HTTPError) as e:
        main_server.get_json("/v1/models/no-such-model")
    assert e.value.code == 404


def test_server_info_names_the_model_path(main_server: ServerProcess):
    info = main_server.get_json("/get_server_info")
    assert info["model_path"] and info["model_path"].endswith(".gguf"), info["model_path"]
    assert os.path.exists(info["model_path"])
    assert info["shutdown_timeout"] == 30.0


def test_asgl_bench_serving_writes_where_output_says(main_server: ServerProcess, tmp_path):
    out = tmp_path / "sub" / "results.jsonl"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for cmd in ([sys.executable, "-m", "asgl.cli", "bench", "serving"],
                [sys.executable, "-m", "asgl.bench_serving"]):
        proc = subprocess.run([*cmd, "--base-url", main_server.url, "--num-prompts", "2",
                               "--input-len", "8", "--output-len", "2", "--disable-tqdm",
                               "--output", str(out)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["completed"] == 2
    # nothing written into the working directory
    assert sorted(os.listdir(tmp_path)) == ["sub"]
