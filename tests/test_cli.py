"""`asgl generate` end to end, as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asgl.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_chat_prompt():
    proc = run_cli("generate", "--chat", "--prompt", "What is the capital of France?",
                   "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_unknown_model_path_is_a_clear_error():
    proc = run_cli("generate", "--model-path", "/no/such/model", "--prompt", "hi")
    assert proc.returncode == 2
    assert "/no/such/model" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_option_value_is_a_clear_error():
    proc = run_cli("generate", "--prompt", "hi", "--mem-fraction-static", "1.5")
    assert proc.returncode == 2
    assert "--mem-fraction-static" in proc.stderr
