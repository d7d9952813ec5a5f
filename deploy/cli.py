"""The `loraloop` command line. Packages add their own subcommands through a `register(subparsers)`
function; a command raises a ``core.errors.LoraloopError`` and ``main`` alone turns it into one line on
stderr and the error's exit code (``core.errors.ExitCode``)."""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import sys
from collections.abc import Sequence

from core.errors import ExitCode, LoraloopError
from core.settings import Settings, load_settings

logger = logging.getLogger("loraloop")

#: Modules that contribute subcommands via `register(subparsers)`, in the loop's order.
_PLUGINS = ("feedback.cli", "retrain.cli", "deploy.commands", "deploy.demo", "deploy.config_cmd")
CONFIG_HELP = "YAML settings file (LORALOOP_* environment variables override it)"


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    return load_settings(getattr(args, "config", None), **{k: v for k, v in overrides.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from retrain.models.prepare import prepare_model
    from serving.app import build_app

    settings = _settings(args, host=args.host, port=args.port, model=args.model)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request is noise
    model_path = None
    if settings.backends.mode == "managed":
        print(f"preparing base model {settings.model!r} (cached in {settings.cache_dir}) ...", flush=True)
        model_path = prepare_model(settings.model, settings.cache_dir)
        if settings.quantization:
            from retrain.models.quantize import prepare_quantized

            model_path = prepare_quantized(model_path, settings.quantization, settings.cache_dir,
                                           adapters_configured=bool(settings.adapters))  # fmt: skip
    app = build_app(settings, model_path=model_path)
    # Everything built so far lives as long as the process: move it out of the cyclic GC's reach, so
    # full collections under load scan only per-request garbage (as vLLM's API server does).
    gc.collect()
    gc.freeze()
    print(f"loraloop gateway on http://{settings.host}:{settings.port} (aliases: {', '.join(settings.aliases)})")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                timeout_keep_alive=settings.keepalive_s)  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraloop", description="Keep fine-tuned LLMs improving in production.")
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the OpenAI-compatible gateway (and a managed vLLM)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--model", help="base model: tiny, smollm2, a local directory or a hub id")
    p.set_defaults(func=cmd_serve)

    for name in _PLUGINS:
        importlib.import_module(name).register(sub)
    _add_global_options(parser)
    return parser


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` is accepted, and listed in the help, at every level: `loraloop --config F events status`
    and `loraloop events status --config F` are the same command. SUPPRESS: a subcommand that is not given
    the option keeps the value given before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                if "--config" not in command._option_string_actions:
                    command.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
                _add_global_options(command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "needs_settings", False):
            args.settings = _settings(args)
        code: int = args.func(args)
        return code
    except LoraloopError as exc:
        logger.debug("command failed", exc_info=True)
        print(f"loraloop: error: {exc.one_line()}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:  # the operator gets one line; details go to the log at debug level
        logger.debug("command failed", exc_info=True)
        name = type(exc).__name__
        print(f"loraloop: error: {name}: {exc}".splitlines()[0], file=sys.stderr)
        return int(ExitCode.FAILED)


if __name__ == "__main__":
    sys.exit(main())
