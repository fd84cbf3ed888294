"""Helpers for the tensor- and data-parallel tests: engines in subprocesses (each in its
own process group, killed whole in `finally`), TP=1 references with top-2 gaps, and the
near-tie comparison rule of the engine tests."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIE_GAP = 1e-3
log = logging.getLogger(__name__)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


@contextmanager
def process_group(cmd: list[str], stdin: Optional[bytes] = None) -> Iterator[subprocess.Popen]:
    """Start `cmd` in a new session with its output in a temp log file (`proc.log_path`);
    on exit kill the whole session (the command and every rank/replica it started)."""
    log_file = tempfile.NamedTemporaryFile(prefix="asgl-par-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log_file,
                            stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                            start_new_session=True)
    proc.log_path = log_file.name
    if stdin is not None:
        proc.stdin.write(stdin)
    proc.stdin.close()
    try:
        yield proc
    finally:
        kill_group(proc)
        log_file.close()
        os.unlink(log_file.name)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def read_log(proc: subprocess.Popen) -> str:
    with open(proc.log_path, errors="replace") as f:
        return f.read()


class Driver:
    """An engine from `options` in a subprocess (tests/tp_driver.py), started at once;
    `result()` waits for its greedy outputs. Several can run side by side; `close()` kills
    the driver with every process it started."""

    def __init__(self, options: dict, prompts: list, params: dict):
        spec = json.dumps({"options": options, "prompts": prompts, "params": params}).encode()
        self._ctx = process_group([sys.executable, os.path.join(REPO, "tests", "tp_driver.py")],
                                  spec)
        self.proc = self._ctx.__enter__()

    def result(self, timeout: float = 180.0) -> list[list[int]]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"driver timed out:\n{read_log(self.proc)[-4000:]}") from None
        out = read_log(self.proc)
        assert self.proc.returncode == 0, f"driver failed ({self.proc.returncode}):\n{out[-4000:]}"
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, out[-4000:]
        return json.loads(lines[-1][len("RESULT "):])

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


def reference(llm, prompts: list, params: dict) -> list[tuple[list[int], list[float]]]:
    """TP=1 greedy ids and the top-2 logprob gap (= logit gap) at every generated token."""
    outs = llm.generate(prompts, params, return_logprob=True, top_logprobs_num=2)
    refs = []
    for out in outs:
        gaps = [float(top[0][0] - top[1][0]) for top in out.output_top_logprobs]
        refs.append((out.output_ids, gaps))
    return refs


def assert_greedy_matches(got: list[int], ref: tuple[list[int], list[float]], what: str) -> None:
    """Equal token for token, except after a near-tie (gap < TIE_GAP) of the reference."""
    ref_ids, gaps = ref
    for i, (a, b) in enumerate(zip(got, ref_ids)):
        if a != b:
            assert gaps[i] < TIE_GAP, (f"{what}: token {i} differs ({a} vs TP=1 {b}) where the "
                                       f"top-2 gap is {gaps[i]:.2e}\n got {got}\n ref {ref_ids}")
            log.warning("%s: near-tie divergence at token %d (gap %.2e)", what, i, gaps[i])
            return
    assert len(got) == len(ref_ids), f"{what}: {len(got)} tokens vs TP=1 {len(ref_ids)}"
