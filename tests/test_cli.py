"""`asgl generate` end to end, as a user runs it.

The three runs are independent processes: they start together when the module starts (a
run is mostly one core of start-up work), and each test checks its own."""

from __future__ import annotations

import subprocess
import sys

import pytest

RUNS = {
    "chat": ("generate", "--chat", "--prompt", "What is the capital of France?",
             "--max-new-tokens", "12"),
    "unknown_model": ("generate", "--model-path", "/no/such/model", "--prompt", "hi"),
    "bad_option": ("generate", "--prompt", "hi", "--mem-fraction-static", "1.5"),
}


class CliRun:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "asgl.cli", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> subprocess.CompletedProcess:
        """The finished run, as subprocess.run(..., capture_output=True) returns it."""
        try:
            stdout, stderr = self.proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def runs():
    started = {name: CliRun(*args) for name, args in RUNS.items()}
    yield started
    for run in started.values():
        if run.proc.poll() is None:
            run.proc.kill()
        run.proc.communicate()


def test_generate_chat_prompt(runs):
    proc = runs["chat"].result()
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_unknown_model_path_is_a_clear_error(runs):
    proc = runs["unknown_model"].result()
    assert proc.returncode == 2
    assert "/no/such/model" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_option_value_is_a_clear_error(runs):
    proc = runs["bad_option"].result()
    assert proc.returncode == 2
    assert "--mem-fraction-static" in proc.stderr
