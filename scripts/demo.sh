#!/usr/bin/env bash
# The split over HTTP on loopback: start the tail service in the background, wait until it is ready, ask the
# client the prompt, stop the service. Usage: scripts/demo.sh BUNDLE_DIR PORT "prompt" [python]
# The service's log is kept in BUNDLE_DIR/demo-service.log (SPLIT_SERVER_LOG_LEVEL=DEBUG for more of it).
set -euo pipefail
bundle=$1 port=$2 prompt=$3 python=${4:-python3}
log="$bundle/demo-service.log"

# Something else on the port (a `make serve` left running) would answer in our service's place.
if ! "$python" -c '
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: fails only if someone listens
s.bind(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null; then
    echo "demo: port $port on 127.0.0.1 is already in use (a \`make serve\` still running?);" \
         "stop that, or run the demo on another port: make demo PORT=8001" >&2
    exit 1
fi

"$python" -m services --bundle "$bundle/server" --host 127.0.0.1 --port "$port" 2>"$log" &
service=$!
trap 'status=$?; kill "$service" 2>/dev/null || true; wait "$service" 2>/dev/null || true; exit $status' EXIT
"$python" - "$port" "$service" "$log" <<'PY'
import os, sys, time, httpx
port, pid, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def gone() -> bool:
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True

deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    if gone():  # checked first: only our own service's answer counts
        sys.exit(f"the tail service exited; its log ({log}):\n" + open(log).read())
    try:
        if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.2)
sys.exit(f"the tail service did not become ready in 120 s; its log ({log}):\n" + open(log).read())
PY
echo "tail service ready on 127.0.0.1:$port (layers [K, N) run there); its log: $log" >&2
"$python" -m client --bundle "$bundle" --server-url "http://127.0.0.1:$port" --stats "$prompt"
