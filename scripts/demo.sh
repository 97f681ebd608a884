#!/usr/bin/env bash
# The split over HTTP on loopback: start the tail service in the background, wait until it is ready, ask the
# client the prompt, stop the service. Usage: scripts/demo.sh BUNDLE_DIR PORT "prompt" [python]
set -euo pipefail
bundle=$1 port=$2 prompt=$3 python=${4:-python3}
log=$(mktemp -t split-service.XXXXXX.log)
"$python" -m services --bundle "$bundle/server" --host 127.0.0.1 --port "$port" 2>"$log" &
service=$!
trap 'kill "$service" 2>/dev/null; wait "$service" 2>/dev/null; rm -f "$log"' EXIT
"$python" - "$port" "$service" "$log" <<'PY'
import os, sys, time, httpx
port, pid, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the tail service exited:\n" + open(log).read())
    time.sleep(0.2)
sys.exit("the tail service did not become ready in 120 s:\n" + open(log).read())
PY
echo "tail service ready on 127.0.0.1:$port (layers run there: see its log with LOG_LEVEL=DEBUG)" >&2
"$python" -m client --bundle "$bundle" --server-url "http://127.0.0.1:$port" --stats "$prompt"
