"""``python -m services``: serve the tail of a split bundle over HTTP (TLS when a certificate is configured).

On SIGTERM the service first reports 503 on /readyz for ``drain_s`` seconds (so load balancers stop sending new
sessions) while live sessions keep working, then stops, giving in-flight requests ``graceful_shutdown_s``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from services.app import create_app, load_service
from services.logs import configure
from services.settings import ServerSettings
from splitcore.errors import SplitError
from splitcore.manifest import load_bundle
from splitcore.providers import choose_providers

log = logging.getLogger("services")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self.app, self.drain_s, self.draining = app, drain_s, False

    def handle_exit(self, sig: int, frame) -> None:
        if self.draining or self.drain_s == 0:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        service = getattr(self.app.state, "service", None)
        if service is not None:
            service.draining = True
        log.info("draining: /readyz reports 503 for %.0f s, then shutting down", self.drain_s)
        threading.Timer(self.drain_s, super().handle_exit, (sig, None)).start()

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal that stopped it once it has shut down, so a graceful stop on SIGTERM would
        # end as "killed by SIGTERM" (exit 143). A drained, finished shutdown is a clean exit: 0.
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--host", help="bind address (default: SPLIT_SERVER_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: SPLIT_SERVER_PORT or 8000)")
    p.add_argument("--bundle", help="server bundle directory (default: SPLIT_SERVER_BUNDLE)")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as e:
        problems = "; ".join(f"SPLIT_SERVER_{'.'.join(map(str, err['loc'])).upper()}: {err['msg']}"
                             for err in e.errors())
        print(f"services: error: invalid settings: {problems}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    try:
        choose_providers(settings.providers or None)
        bundle = load_bundle(settings.bundle, "server")
        service = load_service(settings, bundle)
    except SplitError as e:
        print(f"services: error: {e}", file=sys.stderr)
        return 2
    app = create_app(settings, bundle, service)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        log_config=None,
        access_log=settings.access_log,
        server_header=False,
    )
    server = DrainingServer(config, app, settings.drain_s)
    server.run()
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
