"""``python -m services.wait_bundle``: wait until the export has finished the server bundle (an init container).

`kubectl apply -f k8s` starts the export Job and the Deployment together; without this the service would crash-loop
until the bundle exists. Export writes a provisional manifest before it validates, so "finished" means a manifest
whose validation passed: a pod started on the provisional one would serve a manifest hash no client has.
"""

from __future__ import annotations

import argparse
import sys
import time

from services.settings import ServerSettings
from splitcore.errors import SplitError
from splitcore.manifest import MANIFEST_FILE, parse_manifest


def finished(path) -> bool:
    try:
        return parse_manifest(path.read_bytes(), str(path)).validation.get("status") == "passed"
    except (OSError, SplitError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.wait_bundle", description=__doc__.split("\n")[0])
    p.add_argument("--timeout-s", type=float, default=3600.0)
    p.add_argument("--interval-s", type=float, default=5.0)
    args = p.parse_args(argv)
    path = ServerSettings().bundle / MANIFEST_FILE
    started = last_said = time.monotonic()
    while not finished(path):
        now = time.monotonic()
        if now - started > args.timeout_s:
            print(f"wait_bundle: error: no finished bundle at {path} after {args.timeout_s:.0f} s; "
                  "check the export job: kubectl -n split-inference logs job/split-export", file=sys.stderr)
            return 1
        if now - last_said >= 30:
            print(f"wait_bundle: waiting for {path} ({now - started:.0f} s)", file=sys.stderr)
            last_said = now
        time.sleep(args.interval_s)
    print(f"wait_bundle: {path} is ready", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
