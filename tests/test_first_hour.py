"""The first minutes of a new user: a light `import asgl`, a quick CLI, `--version`.

Each check runs in a fresh interpreter (`sys.modules` of this pytest process already holds
torch), so what is measured is what a user's `python -c "import asgl"` pays.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "numpy", "asgl.engine", "asgl.models", "asgl.server")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)


def _loaded_after(code: str) -> list[str]:
    probe = (f"import sys\n{code}\nimport json\n"
             f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
             f"{('torch', 'transformers', 'numpy')!r} or m in {HEAVY!r})))")
    proc = _python(probe)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_asgl_and_frontend_load_nothing_heavy():
    assert _loaded_after("import asgl, asgl.lang\nfrom asgl import RuntimeEndpoint, gen, "
                         "function, OpenAI\nfrom asgl.lang import select") == []


def test_cli_parsing_loads_nothing_heavy():
    code = ("from asgl.cli import build_parser\n"
            "build_parser().parse_args(['serve', '--port', '0', '--tp', '1'])\n"
            "build_parser().parse_args(['generate', '--prompt', 'hi'])")
    assert _loaded_after(code) == []


def test_engine_names_still_resolve_lazily():
    proc = _python("import asgl, sys\nassert 'torch' not in sys.modules\n"
                   "print(asgl.Engine.__module__, asgl.EngineConfig.__name__, "
                   "asgl.SamplingParams.__name__)\nassert 'torch' in sys.modules")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["asgl.engine.loop.engine", "EngineConfig", "SamplingParams"]
    proc = _python("import asgl\nasgl.NoSuchName")
    assert "AttributeError" in proc.stderr and "NoSuchName" in proc.stderr


def _import_us(code: str, module: str) -> int:
    """Cumulative microseconds of `module` in `python -X importtime -c code`."""
    proc = _python(code, "-X", "importtime")
    assert proc.returncode == 0, proc.stderr
    for line in proc.stderr.splitlines():
        fields = [f.strip() for f in line.removeprefix("import time:").split("|")]
        if len(fields) == 3 and fields[2] == module:
            return int(fields[1])
    raise AssertionError(f"{module} not in -X importtime output:\n{proc.stderr[-2000:]}")


def test_import_budget():
    # The budgets: `import asgl` < 0.5 s, `asgl --help` < 1 s (its imports are
    # asgl.cli's, and argparse's work on top is milliseconds). Best of 3: the machine is shared.
    assert min(_import_us("import asgl", "asgl") for _ in range(3)) < 500_000
    assert min(_import_us("import asgl.lang", "asgl.lang") for _ in range(3)) < 500_000
    assert min(_import_us("import asgl.cli", "asgl.cli") for _ in range(3)) < 1_000_000


def test_version_and_help_are_quick():
    import time

    from asgl import __version__

    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "asgl.cli", "--version"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"asgl {__version__}"
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "asgl.cli", "serve", "--help"],
                              capture_output=True, text=True, env=env, timeout=60)
        best = min(best, time.perf_counter() - started)
        assert proc.returncode == 0, proc.stderr
    assert best < 1.0, best


# ---------------------------------------------------------------------------- early errors
def _serve_fails(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    import time

    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "asgl.cli", "serve", *args],
                          capture_output=True, text=True, env=env, timeout=120)
    return proc, time.perf_counter() - started


@pytest.mark.parametrize("args, message", [
    (("--tool-call-parser", "nope"), "unknown --tool-call-parser 'nope'"),
    (("--chat-template", "no-such-template"), "--chat-template 'no-such-template' is neither"),
    (("--model-path", "/no/such/model"), "--model-path '/no/such/model': no such file"),
], ids=["tool-call-parser", "chat-template", "model-path"])
def test_bad_argument_fails_before_loading(args, message):
    proc, took = _serve_fails("--port", "0", *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "Loading" not in proc.stderr and " loaded in " not in proc.stderr  # no weights
    assert took < 2.0, took


def test_busy_port_fails_before_loading():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, took = _serve_fails("--port", str(port))
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Loading" not in proc.stderr and "Traceback" not in proc.stderr
    assert took < 2.0, took


def test_flags_that_do_nothing_here_are_named_in_one_warning(caplog):
    from asgl.config import EngineConfig
    from asgl.server.launch import warn_inapplicable_flags

    cfg = EngineConfig(mem_fraction_static=0.5, disable_cuda_graph=True)
    with caplog.at_level("WARNING"):
        line = warn_inapplicable_flags(cfg, on_cpu=True)
    assert line == "--mem-fraction-static, --disable-cuda-graph do nothing on the CPU: ignored"
    assert [r.getMessage() for r in caplog.records] == [line]
    assert warn_inapplicable_flags(EngineConfig(), on_cpu=True) is None
    assert "--cpu-kv-budget-gb" in warn_inapplicable_flags(EngineConfig(cpu_kv_budget_gb=4),
                                                           on_cpu=False)
    from asgl.server.launch import warn_no_effect_flags

    assert warn_no_effect_flags(EngineConfig()) is None
    assert warn_no_effect_flags(EngineConfig(revision="main")).startswith(
        "--revision does nothing in asgl")


def test_ready_line_has_a_curl_and_the_v1_base_url():
    from asgl.server.launch import ready_message

    text = ready_message("0.0.0.0", 8080, "m", 2048)
    assert "OpenAI base URL http://127.0.0.1:8080/v1" in text
    curl = text.splitlines()[-1].split("try: ", 1)[1]
    assert curl.startswith("curl http://127.0.0.1:8080/v1/chat/completions ")
    body = curl.split(" -d '", 1)[1].rstrip("'")
    assert json.loads(body)["messages"][0]["content"] == "Hello!"


# ---------------------------------------------------------------------------- GGUF cache
def test_gguf_conversion_is_cached_by_content(tmp_path, monkeypatch, caplog):
    """A second start reuses the conversion, and so does a copy of the file elsewhere (a new
    venv, or a container whose cache is on a volume); a changed file converts again."""
    import shutil

    from asgl.models import gguf_loader
    from test_loader import tiny_hf_model, write_tiny_gguf

    monkeypatch.setenv("ASGL_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model())
    with caplog.at_level("INFO", logger="asgl.models.gguf_loader"):
        first = gguf_loader.convert_gguf(str(tmp_path / "tiny.gguf"))
        assert any(r.getMessage().startswith("converting ") for r in caplog.records)
        caplog.clear()
        assert gguf_loader.convert_gguf(str(tmp_path / "tiny.gguf")) == first
        (tmp_path / "elsewhere").mkdir()
        copy = shutil.copy(tmp_path / "tiny.gguf", tmp_path / "elsewhere" / "tiny.gguf")
        assert gguf_loader.convert_gguf(copy) == first
        messages = [r.getMessage() for r in caplog.records]
        assert not any(m.startswith("converting ") for m in messages), messages
        assert sum(m.startswith("using the conversion of tiny.gguf") for m in messages) == 2
    write_tiny_gguf(tmp_path / "elsewhere" / "tiny.gguf", tiny_hf_model(), rope_factor=8.0)
    assert gguf_loader.convert_gguf(copy) != first


def test_startup_phases_are_timed_from_their_log_lines(caplog):
    import logging

    from asgl.server.launch import StartupPhases

    phases = StartupPhases()
    root = logging.getLogger()
    root.addHandler(phases)
    try:
        with caplog.at_level("INFO"):
            phases.mark("imports")
            logging.getLogger("asgl.engine.worker.model_runner").info("model X loaded in 1.0s")
            logging.getLogger("asgl.engine.loop.engine").info("KV pool: %d tokens", 5)
            logging.getLogger("asgl.engine.loop.engine").info("something else")
    finally:
        root.removeHandler(phases)
    assert [name for name, _ in phases.phases] == ["imports", "weights", "KV pool"]
    lines = [r.getMessage() for r in caplog.records if r.name == "asgl.server.launch"]
    assert [line.rsplit(" ", 2)[0] for line in lines] == [
        "start-up: imports", "start-up: weights", "start-up: KV pool"]
    assert phases.summary().startswith("started in ")


# ---------------------------------------------------------------------------- --help
def _help(*args: str) -> str:
    import contextlib
    import io

    from asgl.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0
    return out.getvalue()


def test_serve_help_is_grouped_with_each_default_once():
    text = _help("serve")
    sections = [line[:-len(" options:")] for line in text.splitlines()
                if line.endswith(" options:")]
    assert sections[:9] == ["model", "serving", "API", "request limits", "scheduling",
                            "memory", "parallelism", "kernels", "logging"], sections
    assert "--shutdown-timeout" in text.split("serving options:")[1].split("API options:")[0]
    # an option's help (its lines up to the next option) says "default" at most once
    import re

    for block in re.split(r"\n  (?=-)", text):
        assert block.count("default") <= 1, block
    assert "(default: None)" not in text
    assert text.startswith("usage: asgl serve [options]")


def test_subcommands_show_only_their_own_flags():
    gen = _help("generate")
    for server_only in ("--port", "--api-key", "--shutdown-timeout", "--max-tools"):
        assert server_only not in gen
    assert "--prompt" in gen and "--model-path" in gen
    bench = _help("bench", "offline")
    assert "--workload" in bench and "--output" in bench and "--port" not in bench
    serving = _help("bench", "serving")
    assert "--base-url" in serving and "--model-path" not in serving


def test_frontend_renders_chat_templates_without_transformers():
    """A frontend-only install (no transformers) renders the server's chat template with
    jinja2 alone, exactly as transformers does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from asgl.engine.loop.tokenizer import BUILTIN_CHAT_TEMPLATES
    from asgl.lang.backends.runtime_endpoint import _jinja_render

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    for name, text in BUILTIN_CHAT_TEMPLATES.items():
        for gen_prompt in (False, True):
            expected, _ = render_jinja_template([messages], chat_template=text,
                                                add_generation_prompt=gen_prompt, **special)
            assert _jinja_render(text, special)(messages, gen_prompt) == expected[0], name


def test_dp_replica_output_is_prefixed_line_by_line():
    import io

    from asgl.engine.dp.engine import prefix_output

    text = b"2026 INFO loaded\nbar 10%\rbar 100%\nTraceback\n  x\npartial"
    for redraws, bar in ((True, b"[DP1] bar 10%\r[DP1] bar 100%\n"),
                         (False, b"[DP1] bar 100%\n")):
        dst = io.BytesIO()
        prefix_output(io.BufferedReader(io.BytesIO(text)), b"[DP1] ", dst, redraws=redraws)
        assert dst.getvalue() == (b"[DP1] 2026 INFO loaded\n" + bar +
                                  b"[DP1] Traceback\n[DP1]   x\n[DP1] partial")


def test_fast_tier_still_covers_the_whole_path():
    """The default selection keeps an engine greedy-vs-HF test, server streaming and
    shutdown tests and asgl.lang programs against a live server; every slow file exists."""
    from conftest import SLOW_FILES

    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("test_engine_hf.py", "test_server_openai.py", "test_shutdown.py",
                 "test_lang_openai.py", "test_lang_core.py", "test_first_hour_server.py"):
        assert name not in SLOW_FILES and os.path.exists(os.path.join(here, name)), name
    assert all(os.path.exists(os.path.join(here, name)) for name in SLOW_FILES)
    with open(os.path.join(here, "test_lang_openai.py")) as f:
        assert "main_server" in f.read()  # a program against the real server, not a fake


def test_early_checks_agree_with_the_modules_they_read():
    """preflight reads the tool-call formats and chat template names from the sources (an
    import would cost seconds); they must agree with what the modules accept."""
    from asgl.config import ConfigError
    from asgl.engine.loop.tokenizer import BUILTIN_CHAT_TEMPLATES
    from asgl.server import launch
    from asgl.server.tool_calls import FORMATS, _ALIASES, get_format

    assert launch._builtin_template_names() == list(BUILTIN_CHAT_TEMPLATES)
    for name in [*FORMATS, *_ALIASES, None]:
        launch.check_tool_call_parser(name)
        get_format(name)
    with pytest.raises(ConfigError) as e:
        launch.check_tool_call_parser("nope")
    with pytest.raises(ValueError) as expected:
        get_format("nope")
    assert str(e.value) == str(expected.value)


def test_torch_compile_says_when_it_compiles(caplog):
    import torch

    from asgl.server.launch import log_torch_compiles

    log_torch_compiles()
    f = torch.compile(lambda x: x * 2 + 1, backend="eager")
    with caplog.at_level("INFO", logger="asgl.server.launch"):
        f(torch.ones(3))
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("torch.compile: compiling for a new batch shape") for m in lines)
    assert any(m.startswith("torch.compile: compiled in ") for m in lines), lines
