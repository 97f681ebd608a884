"""``python -m services.healthcheck``: exit 0 when the service in this container answers /healthz.

For the image's HEALTHCHECK (Kubernetes uses its own probes): the runtime image has no curl, and this reads the same
SPLIT_SERVER_* settings as the service, so it follows the port and TLS the service was given.
"""

from __future__ import annotations

import ssl
import sys
import urllib.request

from services.settings import ServerSettings

WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def main() -> int:
    settings = ServerSettings()
    host = WILDCARD.get(settings.host, settings.host)
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if settings.tls_cert else "http"
    # The certificate names the public host, not loopback: check liveness, not identity.
    context = ssl._create_unverified_context() if scheme == "https" else None
    try:
        with urllib.request.urlopen(f"{scheme}://{host}:{settings.port}/healthz", timeout=3, context=context) as r:
            return 0 if r.status == 200 else 1
    except OSError as e:
        print(f"healthcheck: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
