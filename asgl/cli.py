"""`asgl` command line: `asgl serve`, `asgl generate`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from asgl.config import ConfigError, EngineConfig


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(args: argparse.Namespace) -> int:
    from asgl.server.launch import run_server

    cfg = EngineConfig.from_namespace(args)
    _setup_logging(cfg.log_level)
    run_server(cfg)
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    from asgl import __version__

    parser = argparse.ArgumentParser(prog="asgl", description="asgl: serve and run LLMs")
    parser.add_argument("--version", action="version", version=f"asgl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server (native + OpenAI-compatible API)")
    EngineConfig.add_cli_args(serve)
    serve.set_defaults(func=_serve)
    gen = sub.add_parser("generate", help="generate text for one prompt (a quick local check)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    EngineConfig.add_cli_args(gen)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
