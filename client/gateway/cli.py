"""``python -m client serve``: the OpenAI-compatible gateway on loopback; prompts and token ids stay here."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from client.cli import SETTING_FLAGS
from client.gateway.app import create_app
from client.gateway.engine import Engine
from client.gateway.settings import GatewaySettings
from client.settings import ClientSettings
from client.split import Split
from splitcore.errors import SplitError

log = logging.getLogger("client.gateway")

GATEWAY_FLAGS = {
    "--host": ("host", str, "bind address (default 127.0.0.1; another needs --allow-remote and an API key)"),
    "--port": ("port", int, "port (default 8080)"),
    "--pool-size": ("pool_size", int, "idle conversations kept for prefix reuse"),
    "--max-concurrent": ("max_concurrent", int, "requests generating at once"),
}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, GatewaySettings, ClientSettings]:
    p = argparse.ArgumentParser(
        prog="python -m client serve", description=__doc__.split(": ", 1)[1],
        epilog="The API key comes from SPLIT_GATEWAY_API_KEY (never a flag: flags show up in `ps`).",
    )
    p.add_argument("--local", action="store_true", help="run the tail in this process too (no tail service)")
    p.add_argument("--allow-remote", action="store_true", default=None,
                   help="permit a non-loopback --host (requires SPLIT_GATEWAY_API_KEY)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    for flags in (GATEWAY_FLAGS, SETTING_FLAGS):
        for flag, (dest, kind, help_text) in flags.items():
            p.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
    args = p.parse_args(argv)

    def given(flags: dict) -> dict:
        return {dest: getattr(args, dest) for dest, _, _ in flags.values() if getattr(args, dest) is not None}

    try:
        extra = {"allow_remote": True} if args.allow_remote else {}
        gateway = GatewaySettings(**given(GATEWAY_FLAGS), **extra)
        client = ClientSettings(**given(SETTING_FLAGS))
    except ValueError as e:
        p.error(str(e).replace("\n", " "))
    return args, gateway, client


# Libraries that log each HTTP request at INFO: each generated token is one request to the tail service.
PER_REQUEST_LOGGERS = ("httpx", "httpcore")


def configure_logging(level: str) -> None:
    """One line per gateway request at INFO; per-token lines (the tail requests) only at DEBUG."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in PER_REQUEST_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args, gateway, client = parse_args(sys.argv[1:] if argv is None else argv)
    level = "DEBUG" if args.verbose else os.environ.get("LOG_LEVEL", "INFO")
    configure_logging(level)
    try:
        engine = Engine(Split(client, args.local, keep_spare=True), gateway.pool_size)
    except SplitError as e:
        print(f"client serve: error: {e}", file=sys.stderr)
        return 2
    where = "in process" if args.local else f"at {client.server_url}"
    log.info("OpenAI-compatible API on http://%s:%d/v1 for %s; tail %s", gateway.host, gateway.port,
             engine.model_id, where)
    app = create_app(gateway, lambda: engine)
    config = uvicorn.Config(app, host=gateway.host, port=gateway.port, log_config=None, server_header=False)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 3
