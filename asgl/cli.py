"""`asgl` command line: `asgl serve`, `asgl generate`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from asgl.bench import BENCHES
from asgl.config import ConfigError, EngineConfig


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(args: argparse.Namespace) -> int:
    from asgl.server.launch import run_server

    cfg = EngineConfig.from_namespace(args)
    _setup_logging(cfg.log_level)
    run_server(cfg)
    # The engine, its threads and processes are stopped: skip the interpreter's teardown of
    # the model and torch, which took 3-4 s on a loaded CPU, past --shutdown-timeout's word.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _generate(args: argparse.Namespace) -> int:
    from asgl.engine.loop.engine import Engine
    from asgl.server.launch import preflight

    cfg = EngineConfig.from_namespace(args)
    _setup_logging(cfg.log_level if args.log_level != "info" else "warning")
    preflight(cfg, bind=False)  # a mistake in the arguments costs no model load

    async def run() -> None:
        async with Engine(cfg) as engine:
            prompt = args.prompt
            if args.chat:
                from asgl.engine.loop.tokenizer import apply_chat_template
                prompt = apply_chat_template(engine.tokenizer,
                                             [{"role": "user", "content": prompt}],
                                             chat_template=engine.chat_template)
            params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
            async for chunk in engine.generate_stream(prompt, params):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            sys.stdout.write("\n")

    asyncio.run(run())
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    from asgl.server.launch import preflight
    from asgl.server.run_batch import run_batch

    cfg = EngineConfig.from_namespace(args)
    _setup_logging(cfg.log_level if args.log_level != "info" else "warning")
    preflight(cfg, bind=False)
    return run_batch(cfg, args.input_file, args.output_file)


def build_parser() -> argparse.ArgumentParser:
    from asgl import __version__
    from asgl.bench import BENCHES
    from asgl.config import GROUP_ORDER, SERVER_ONLY_GROUPS

    parser = argparse.ArgumentParser(prog="asgl", description="asgl: serve and run LLMs")
    parser.add_argument("--version", action="version", version=f"asgl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server (native + OpenAI-compatible API)",
                           usage="%(prog)s [options]", description="Run the HTTP server "
                           "(SGLang's native API and the OpenAI API).")
    EngineConfig.add_cli_args(serve)
    serve.set_defaults(func=_serve)
    gen = sub.add_parser("generate", help="generate text for one prompt (a quick local check)",
                         usage="%(prog)s --prompt TEXT [options]")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    EngineConfig.add_cli_args(gen, groups=[g for g in GROUP_ORDER
                                           if g not in SERVER_ONLY_GROUPS])
    gen.set_defaults(func=_generate)
    batch = sub.add_parser("run-batch", help="run an OpenAI batch file offline (as vllm "
                           "run-batch)", usage="%(prog)s -i IN.jsonl -o OUT.jsonl [options]")
    batch.add_argument("-i", "--input-file", required=True, help="batch input (JSONL)")
    batch.add_argument("-o", "--output-file", required=True, help="results (JSONL)")
    EngineConfig.add_cli_args(batch, groups=[g for g in GROUP_ORDER
                                             if g not in ("serving", "API")])
    batch.set_defaults(func=_run_batch)
    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHES),
                           usage="%(prog)s {" + ",".join(BENCHES) + "} [options]",
                           description="`asgl bench NAME --help` shows each one's options.")
    bench.add_argument("name", choices=list(BENCHES))
    bench.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    bench.set_defaults(func=_bench)
    return parser


def _bench(args: argparse.Namespace) -> int:
    from asgl.bench import runner

    result = runner(args.name)(args.options, f"asgl bench {args.name}")
    return 1 if isinstance(result, dict) and result.get("failed") else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "bench" and not argv[1].startswith("-"):
        # the benchmark parses its own options, --help included
        args = argparse.Namespace(func=_bench, name=argv[1], options=argv[2:])
        if args.name not in BENCHES:
            args = parser.parse_args(argv)  # the usual "invalid choice" error
    else:
        args = parser.parse_args(argv)
    from asgl.engine.contracts.errors import InvalidRequest
    from asgl.engine.contracts.errors import ModelLoadError

    try:
        return args.func(args)
    except ConfigError as e:
        parser.error(str(e))
    except (ModelLoadError, InvalidRequest) as e:  # the user's input: a message, no traceback
        print(f"asgl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
