"""``python -m services``: serve the tail of a split bundle over HTTP (TLS when a certificate is configured).

On SIGTERM the service first reports 503 on /readyz for ``drain_s`` seconds (so load balancers stop sending new
sessions) while live sessions keep working, then stops, giving in-flight requests ``graceful_shutdown_s``, and
exits 0. The drain lives in the app's lifespan (services/app.py), not in uvicorn's signal handling.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import warnings

import onnxruntime as ort
import uvicorn
from pydantic import ValidationError

from services.app import create_app, load_service
from services.guards import uvicorn_options
from services.logs import configure
from services.settings import ServerSettings
from splitcore.errors import SplitError
from splitcore.manifest import load_bundle
from splitcore.providers import choose_providers

log = logging.getLogger("services")


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
    # onnxruntime reports a provider or graph it cannot load in several lines of its own on stderr (and a Python
    # warning); the SplitError below says it in one.
    ort.set_default_logger_severity(4)
    said = io.StringIO()  # onnxruntime prints its provider fallback ("EP Error ...") on stdout
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(said):
            warnings.simplefilter("ignore")
            choose_providers(settings.providers or None)
            bundle = load_bundle(settings.bundle, "server")
            service = load_service(settings, bundle)
    except SplitError as e:
        causes = (line.strip("* ") for line in said.getvalue().splitlines() if "EP Error" in line)
        cause = next((c for c in causes if c != "EP Error"), None)  # the reason, not the banner around it
        print(f"services: error: {e}" + (f" (onnxruntime: {cause[:300]})" if cause else ""), file=sys.stderr)
        return 2
    sys.stdout.write(said.getvalue())
    server: uvicorn.Server | None = None

    def stop() -> None:
        server.should_exit = True

    app = create_app(settings, bundle, service, stop=stop)
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
        **uvicorn_options(settings),
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
