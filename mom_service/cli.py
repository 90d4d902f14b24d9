"""`mom-service serve`, `mom-service mcp` (the MCP server over stdio), `mom-service eval DATASET` (the evaluation
harness), `mom-service keys ...` (API keys, cli_keys.py), `mom-service demo` (a real local panel: local_demo/) and
`mom-service check-config [PATH]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from types import FrameType

from mom_service.cli_keys import add_parser as add_keys_parser
from mom_service.config import MoMConfig, load_config, resolve_config
from mom_service.errors import ConfigError
from mom_service.settings import Settings


def _check_config(path: str | None, settings: Settings) -> int:
    try:
        if path is None:
            config, used = resolve_config(settings)
        else:
            config, used = load_config(path), path
    except ConfigError as exc:
        print(f"Invalid config:\n{exc}", file=sys.stderr)
        return 1
    source = used or "the built-in demo config (no config.yaml found)"
    print(
        f"{source}: OK: {len(config.models)} MoM model(s) ({', '.join(m.name for m in config.models)}), "
        f"{len(config.llm_definitions)} LLM(s)"
    )
    return 0


STARTUP_FAILED = 3  # uvicorn's own exit status when the app did not start


def _after_graceful_shutdown(signum: int, frame: FrameType | None) -> None:
    """Installed as the pre-uvicorn handler: the shutdown it asked for has already happened."""


def _started(settings: Settings) -> tuple[MoMConfig, str | None] | None:
    """The config to run, validated before anything starts (a wrong one is one clear message: None), and the
    logging set up with it logged; shared by `serve` and `mcp`."""
    try:
        config, path = resolve_config(settings)
    except ConfigError as exc:
        print(f"Invalid config, not starting:\n{exc}", file=sys.stderr)
        return None
    from mom_service.api.app import log_config
    from mom_service.observability.logs import setup_logging
    from mom_service.observability.redaction import Redactor

    setup_logging(Redactor())
    log_config(config, path)
    return config, path


def _serve(settings: Settings, host: str | None, port: int | None) -> int:
    started = _started(settings)
    if started is None:
        return 1
    config, path = started
    import uvicorn

    from mom_service.api.app import create_app
    from mom_service.api.server import DrainingServer

    app = create_app(settings, config, path)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler that was there
    # before it: make that one a no-op, so a graceful shutdown (records drained) exits with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _after_graceful_shutdown)
    server_config = uvicorn.Config(
        app,
        host=host or settings.host,
        port=port if port is not None else settings.port,
        log_level="info",
        access_log=False,  # the request log (request_log.py) writes one richer line per request
    )
    server = DrainingServer(server_config, app, grace_s=settings.mom_shutdown_grace_seconds)
    server.run()
    return 0 if server.started else STARTUP_FAILED


MCP_OFF = 2  # `mom-service mcp` while MOM_MCP_ENABLED is not true


def _mcp(settings: Settings) -> int:
    """The MCP server over stdio: the same state as `serve` builds (config, usage database, writer, cache), no HTTP
    server. stdout carries MCP's messages; the logs go to stderr."""
    if not settings.mom_mcp_enabled:
        print("The MCP server is off: set MOM_MCP_ENABLED=true to run `mom-service mcp`.", file=sys.stderr)
        return MCP_OFF
    started = _started(settings)
    if started is None:
        return 1
    config, path = started
    return asyncio.run(_serve_mcp_stdio(settings, config, path))


async def _serve_mcp_stdio(settings: Settings, config: MoMConfig, path: str | None) -> int:
    """Until the client closes stdin, or SIGTERM: then the calls still running are cancelled and the records
    written before the process ends."""
    from mom_service.api.app import StartupFailed, close_state, open_state
    from mom_service.api.mcp import build_server, stdio_caller

    try:
        state = await open_state(settings, config, path)
    except StartupFailed:
        return 1
    server = build_server(lambda: state, stdio_caller(settings))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    serving = asyncio.ensure_future(server.run_stdio_async())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        serving.cancel()  # on SIGTERM: the tool calls running end (their outcomes recorded as cancelled)
        await close_state(state)
    if not stop.is_set():
        serving.result()  # the client closed stdin; an error of the server's is raised
        return 0
    # The SDK reads stdin in a thread that nothing interrupts: the records written, leave without waiting for it.
    logging.shutdown()
    os._exit(0)


INTERRUPTED = 130  # Ctrl-C, as a shell reports it


def _eval(settings: Settings, args: argparse.Namespace) -> int:
    """A dataset run against MoM models and single LLMs through the engine, as `serve` would answer them."""
    try:
        config, path = resolve_config(settings)
    except ConfigError as exc:
        print(f"Invalid config, not starting:\n{exc}", file=sys.stderr)
        return 1
    from mom_service.evaluation.command import Options, evaluate
    from mom_service.evaluation.errors import EvalError

    options = Options(**{f.name: getattr(args, f.name) for f in fields(Options)})  # the flags' names are its fields
    try:
        return asyncio.run(evaluate(settings, config, path, options))
    except EvalError as exc:
        print(f"mom-service eval: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mom-service eval: interrupted. What finished is in the results file: the same command resumes.")
        return INTERRUPTED


def _eval_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "eval", help="run a JSONL dataset against MoM models and single LLMs, score it, report quality and cost"
    )
    run.add_argument("dataset", help="a JSONL file (`messages` or `question`, optional `answer`), or `basic`")
    run.add_argument("--targets", required=True, help="comma-separated MoM models and LLMs, e.g. mom,mom-rank,gpt4o")
    run.add_argument("--judge", help="the LLM judging items without an answer (pairwise, both orders)")
    run.add_argument("--baseline", help="the target the others are judged against (default: the first target)")
    run.add_argument(
        "--answer-pattern",
        help="a regex whose first group is the final answer (default: the last 'Answer: X' line, else the last line)",
    )
    run.add_argument("--concurrency", type=int, default=4, help="pieces of work at once (default 4)")
    run.add_argument("--max-cost-usd", help="stop starting work that could take this run's spending over it")
    run.add_argument("--results", help="the results file (JSONL) a rerun resumes from (default: DATASET.results.jsonl)")
    run.add_argument("--out", help="a .json file for the report (the PNG plot beside it), or a directory for both")
    run.add_argument("--limit", type=int, help="only the first N items")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mom-service", description="MoM Service: a Mixture-of-Models gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the service (HOST and PORT from the environment)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    commands.add_parser("mcp", help="the MCP server over stdio (MOM_MCP_ENABLED=true)")
    _eval_parser(commands)
    add_keys_parser(commands)
    demo = commands.add_parser(
        "demo", help="a real local panel, offline: a llama.cpp server with SmolLM2 and the service on it (Ctrl-C stops)"
    )
    demo.add_argument("--install-only", action="store_true", help="install llama-cpp-python and the model, then exit")
    check = commands.add_parser("check-config", help="validate a config file and print what is wrong")
    check.add_argument("path", nargs="?", default=None, help="default: MOM_CONFIG, else ./config.yaml")
    args = parser.parse_args(argv)
    settings = Settings()
    if args.command == "check-config":
        return _check_config(args.path, settings)
    if args.command == "mcp":
        return _mcp(settings)
    if args.command == "eval":
        return _eval(settings, args)
    if args.command == "demo":
        from mom_service.local_demo.command import run_demo

        return run_demo(settings, args.install_only)
    if args.command == "keys":
        from mom_service.cli_keys import keys_command

        return keys_command(settings, args)
    return _serve(settings, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
