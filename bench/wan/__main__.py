"""``python -m bench.wan`` (``make bench-wan``): split inference over a delayed link, speculation on and off.

As root it makes two network namespaces joined by a veth pair (bench/wan/netns.py), runs the tail service in one
and the measurement loop (bench/wan/measure.py, the client in process) in the other, and adds the RTT with tc netem
where the kernel has it, else with the delay proxy (bench/wan/proxy.py) in the client's namespace. Elsewhere (not
root, no ``ip``) it says so in one line and runs both on loopback with the proxy; the report states which link it
measured. Everything it starts is stopped, and the namespaces removed, on success, failure, Ctrl-C or SIGTERM.

    python -m bench.wan --bundle bundles/smollm2-k4-int4-mlp          # RTT 0/10/30/80 ms, all prompts, 64 tokens
    python -m bench.wan --bundle DIR --rtts 0 30 --per-kind 1 --new-tokens 16   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import machine
from bench.wan import netns, report
from bench.wan.prompts import PROMPTS_FILE

log = logging.getLogger("bench.wan")

SERVICE_PORT = 8000
# The service as the benchmark runs it: idle keep-alive connections live longer than the gap between two turns of
# one client (the default 5 s would make the client reconnect, and race the server's close, mid-benchmark), few KV
# slots (one client), no drain on stop, warnings only.
SERVICE_ENV = {"SPLIT_SERVER_KEEP_ALIVE_S": "120", "SPLIT_SERVER_MAX_SESSIONS": "4", "SPLIT_SERVER_DRAIN_S": "0",
               "SPLIT_SERVER_GRACEFUL_SHUTDOWN_S": "2", "SPLIT_SERVER_LOG_LEVEL": "WARNING"}
STOP_TIMEOUT_S = 10.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.wan", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-k4-int4-mlp"),
                   help="export output directory (client/ and server/; full/ adds the (b) reference)")
    p.add_argument("--rtts", type=float, nargs="+", default=[0, 10, 30, 80], help="added round-trip times, ms")
    p.add_argument("--new-tokens", type=int, default=64, help="most tokens per turn (EOS may stop earlier)")
    p.add_argument("--per-kind", type=int, default=None, help="first N prompts of each kind (default: all)")
    p.add_argument("--prompts", type=Path, default=PROMPTS_FILE)
    p.add_argument("--loopback", action="store_true", help="skip the namespaces: service and client on loopback")
    p.add_argument("--no-netem", action="store_true", help="use the delay proxy even where tc netem works")
    p.add_argument("--budget-s", type=float, default=3600.0, help="no new turn starts after this long")
    p.add_argument("--out", type=Path, default=Path("reports/wan"), help="report directory")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or any(r < 0 for r in args.rtts):
        p.error("need --new-tokens >= 2 and RTTs >= 0")
    return args


class Stopped(Exception):
    """SIGTERM: unwind like Ctrl-C so every finally block runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Stopped(f"signal {signum}")


def start_service(bundle: Path, host: str, port: int, prefix: list[str]) -> subprocess.Popen:
    command = [*prefix, sys.executable, "-m", "services", "--bundle", str(bundle / "server"), "--host", host,
               "--port", str(port)]
    return subprocess.Popen(command, env={**os.environ, **SERVICE_ENV}, stdout=subprocess.DEVNULL)


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_S)


def run_measure(args: argparse.Namespace, url: str, prefix: list[str], netem: netns.Pair | None,
                service: subprocess.Popen, out: Path) -> dict:
    """The measurement loop as a child process (in the client's namespace); its progress lines pass through."""
    command = [*prefix, sys.executable, "-m", "bench.wan.measure", "--bundle", str(args.bundle), "--server-url", url,
               "--rtts", *(f"{r:g}" for r in args.rtts), "--new-tokens", str(args.new_tokens),
               "--prompts", str(args.prompts), "--budget-s", str(args.budget_s), "--out", str(out)]
    if args.per_kind:
        command += ["--per-kind", str(args.per_kind)]
    if netem is not None:
        command += ["--netem", f"{netem.server_ns}:{netem.server_dev},{netem.client_ns}:{netem.client_dev}"]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + args.budget_s + 900  # the budget bounds new turns; this bounds everything
    try:
        while process.poll() is None:
            if service.poll() is not None:
                raise RuntimeError(f"the tail service exited with code {service.returncode} during the benchmark")
            if time.monotonic() > deadline:
                raise RuntimeError("the measurement ran past its time budget + 15 min; stopped")
            time.sleep(0.5)
    finally:
        stop(process)
    if process.returncode != 0:
        raise RuntimeError(f"the measurement loop failed with exit code {process.returncode} (see above)")
    return json.loads(out.read_text())


def measure_in_namespaces(args: argparse.Namespace, raw: Path) -> tuple[dict, str]:
    with netns.namespace_pair(use_netem=not args.no_netem) as pair:
        how = "tc netem on the veth pair" if pair.netem else "the delay proxy in the client's namespace (this kernel " \
              "has no sch_netem)"
        log.info("wan: namespaces %s (service, %s) and %s (client, %s), delay by %s", pair.server_ns,
                 netns.SERVER_ADDRESS, pair.client_ns, netns.CLIENT_ADDRESS, how)
        service = start_service(args.bundle, netns.SERVER_ADDRESS, SERVICE_PORT, pair.exec_prefix("server"))
        try:
            result = run_measure(args, f"http://{netns.SERVER_ADDRESS}:{SERVICE_PORT}", pair.exec_prefix("client"),
                                 pair if pair.netem else None, service, raw)
        finally:
            stop(service)
        return result, (f"two network namespaces joined by a veth pair (service {netns.SERVER_ADDRESS}, client "
                        f"{netns.CLIENT_ADDRESS}); RTT added by {how}")


def measure_on_loopback(args: argparse.Namespace, raw: Path) -> tuple[dict, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = start_service(args.bundle, "127.0.0.1", port, [])
    try:
        result = run_measure(args, f"http://127.0.0.1:{port}", [], None, service, raw)
    finally:
        stop(service)
    return result, "loopback (127.0.0.1), RTT added by the delay proxy"


def code_version() -> str:
    """The commit the run measured, and whether the client, service or core had uncommitted changes then."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "client", "services", "splitcore"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    return f"{commit or 'unknown'}{' + uncommitted changes in client/, services/ or splitcore/' if dirty else ''}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for side in ("client", "server"):
        if not (args.bundle / side).is_dir():
            print(f"bench.wan: error: {args.bundle / side} is missing; export first, e.g. python -m export --model "
                  f"smollm2 --split-layer 4 --weights int4-mlp --full --out {args.bundle}", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    code = code_version()
    why = None if args.loopback else netns.why_not()
    if why:
        log.warning("wan: cannot make network namespaces (%s): measuring on loopback with the delay proxy", why)
    notes = [f"tail service settings for the run: {', '.join(f'{k}={v}' for k, v in SERVICE_ENV.items())}",
             "RTT 0 still goes through the proxy (one more local hop); the 32-token TTFT is over the direct link, "
             "no proxy", "TTFT runs from opening the turn to the first token; its session was opened during the "
             "previous turn (the client keeps a spare, as the gateway does), and the previous turn's session DELETE "
             "is finished before the clock starts; opening the next turn's spare (a small JSON request on a "
             "thread, after the turn's first token) falls inside a turn, its bytes counted with its decode",
             "connections are warm (one pool per client process, as in a chat or the gateway): a fresh "
             "`python -m client` process pays one more RTT to connect"]
    try:
        with tempfile.TemporaryDirectory(prefix="bench-wan-") as tmp:
            raw = Path(tmp) / "runs.json"
            if why or args.loopback:
                result, link = measure_on_loopback(args, raw)
            else:
                result, link = measure_in_namespaces(args, raw)
    except (KeyboardInterrupt, Stopped):
        log.warning("wan: interrupted; everything it started is stopped")
        return 130
    except (RuntimeError, netns.NamespaceError, subprocess.TimeoutExpired) as e:
        print(f"bench.wan: error: {e}", file=sys.stderr)
        return 1
    load_after = os.getloadavg()
    info = machine.describe()
    result["meta"] = {
        "when": started,
        "machine": f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB",
        "load_before": " ".join(f"{x:.2f}" for x in load_before),
        "load_after": " ".join(f"{x:.2f}" for x in load_after),
        "link_description": link,
        "code": code,
        "notes": notes,
    }
    summary = report.write(result, args.out)
    for f in summary["floors"]:
        log.info("wan: floor %s: %s, target %s: %s", f["name"], f["measured"], f["target"],
                 {True: "holds", False: "MISSED", None: "not measured"}[f["holds"]])
    log.info("wan: wrote %s/wan.{json,md,png}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
