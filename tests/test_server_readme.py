"""SGLang's README snippets, verbatim, against `asgl serve` (port 30000 and model "default"
when the port is free; otherwise only the port is changed). Its embeddings snippet
belongs to the embeddings server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from server_fixture import SGLANG_DEFAULT_PORT, ServerProcess, main_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)

CURL = """curl http://localhost:30000/generate \\
-H "Content-Type: application/json" \\
-d '{
"text": "Once upon a time,",
"sampling_params": {
"max_new_tokens": 16,
"temperature": 0
}
}'"""

OPENAI_SNIPPET = '''import openai
client = openai.Client(
base_url="http://127.0.0.1:30000/v1", api_key="EMPTY")
# Text completion
response = client.completions.create(
model="default",
prompt="The capital of France is",
temperature=0,
max_tokens=32,
)
print(response)
# Chat completion
response = client.chat.completions.create(
model="default",
messages=[
{"role": "system", "content": "You are a helpful AI assistant"},
{"role": "user", "content": "List 3 countries and their capitals."},
],
temperature=0,
max_tokens=64,
)
print(response)
'''


def _on_port(text: str, server: ServerProcess) -> str:
    if server.port == SGLANG_DEFAULT_PORT:
        return text  # unchanged
    return text.replace(":30000", f":{server.port}")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_snippet(main_server):
    out = subprocess.run(["bash", "-c", _on_port(CURL, main_server)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["text"] and body["meta_info"]["completion_tokens"] <= 16


def test_openai_snippet(main_server):
    out = subprocess.run([sys.executable, "-c", _on_port(OPENAI_SNIPPET, main_server)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    completion, chat = out.stdout.strip().split("\n", 1)
    assert completion.startswith("Completion(id='cmpl-") and "text_completion" in completion
    assert chat.startswith("ChatCompletion(id='chatcmpl-") and "role='assistant'" in chat


def test_readme_port_is_the_default():
    """The snippets say port 30000, and `asgl serve` with no --port listens there (the
    tests themselves never bind a fixed port: they rewrite it)."""
    from asgl.config import EngineConfig

    assert EngineConfig().port == SGLANG_DEFAULT_PORT
