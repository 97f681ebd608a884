"""The measurement loop of ``make bench-wan``, run where the client lives (inside the client namespace).

The client is ``client.split.Split`` driven in this process, as the command line and the gateway use it: one
connection pool per Split, a session per turn (opened ahead, during the previous turn, as the gateway keeps a spare)
and deleted when the next turn opens. For each RTT the delay
proxy is started (or netem set), then every prompt runs once with speculation off and once with it on, alternating
which goes first, so drift on a shared machine hits both alike. Before the clock of a turn starts, the previous
turn's session is closed and its (background) DELETE waited for: time to first token never includes it.

Measured per turn: time to first token (from opening the turn to the first token), decode time
(first token to last), tokens, round trips (tail steps) and bytes on the wire before and after the first token.
Also, in this process with no network: local prefill of every prompt (head + tail, ``--local``) and, for a 32-token
prompt, the time to first token of (b) the whole model as one graph, (c) the split in process and the split over
the direct link (no proxy).

    python -m bench.wan.measure --bundle DIR --server-url http://10.203.0.1:PORT --out runs.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from bench.prompts import prompt_ids
from bench.wan.netns import Pair
from bench.wan.prompts import PROMPTS_FILE, Prompt, load_prompts
from bench.wan.proxy import start_proxy
from splitcore.errors import SplitError

log = logging.getLogger("bench.wan")

SETTLE_TIMEOUT_S = 10.0
WARMUP_TOKENS = 4
TTFT32_REPEATS = 5
LOCAL_PREFILL_REPEATS = 3


def settings(bundle: Path, url: str, speculate: bool, new_tokens: int):  # noqa: ANN201 - ClientSettings
    from client.settings import ClientSettings

    return ClientSettings(bundle=bundle, server_url=url, speculate=speculate, max_new_tokens=new_tokens,
                          temperature=0.0)


def open_split(bundle: Path, url: str, speculate: bool, new_tokens: int, local: bool = False):  # noqa: ANN201
    """A remote Split keeps a spare session open, as the gateway does (and as the command line's one conversation
    opens its session while the head loads): a turn takes a session opened during the previous one, so its time to
    first token holds one round trip (the prompt's step), not two."""
    from client.split import Split

    return Split(settings(bundle, url, speculate, new_tokens), local, keep_spare=not local)


def encode(split, text: str) -> list[int]:  # noqa: ANN001 - a client.split.Split
    """The prompt as one user turn through the chat template; bundles without a tokenizer (random:*) get the
    text's UTF-8 bytes as ids, so the loop still runs on them."""
    tokenizer = split.tokenizer
    if tokenizer is None:
        vocab = split.bundle.manifest.model.vocab_size
        return [b % vocab for b in text.encode()][:48]
    if tokenizer.template is None:
        return tokenizer.encode(text)
    return tokenizer.chat_ids([{"role": "user", "content": text}])


def stop_ids(split) -> list[int]:  # noqa: ANN001
    return [] if split.tokenizer is None else list(split.tokenizer.stop_ids)


def settle(split) -> None:  # noqa: ANN001
    """Close the previous turn's session and wait until its DELETE went out (deferred chores run in order)."""
    split.close_links()
    http = getattr(split, "http", None)
    if http is not None and hasattr(http, "defer"):
        done = threading.Event()
        http.defer(done.set)
        if not done.wait(SETTLE_TIMEOUT_S):
            log.warning("wan: the previous session's DELETE did not finish within %.0f s", SETTLE_TIMEOUT_S)


def run_turn(split, ids: Sequence[int], new_tokens: int, stops: Sequence[int]) -> dict:  # noqa: ANN001
    """One turn, timed from opening it to its last token; the previous session is settled first, off the clock."""
    settle(split)
    before = split.traffic.snapshot()
    started = time.perf_counter()
    generator = split.generator(max_length=len(ids) + new_tokens)
    tokens: list[int] = []
    first = None
    at_first = before
    for choice in generator.generate(list(ids), new_tokens, stops):
        if first is None:
            first = time.perf_counter()
            at_first = split.traffic.snapshot()
        tokens.append(int(choice.token))
    end = time.perf_counter()
    after = split.traffic.snapshot()
    first = first or end
    return {
        "prompt_tokens": len(ids), "tokens": len(tokens), "ids": tokens,
        "ttft_s": first - started, "decode_s": end - first,
        "steps": after[2] - before[2], "decode_steps": after[2] - at_first[2],
        "prefill_bytes": (at_first[0] - before[0]) + (at_first[1] - before[1]),
        "decode_sent": after[0] - at_first[0], "decode_received": after[1] - at_first[1],
        "replays": after[3] - before[3],
        "drafted": getattr(generator, "drafted", 0), "accepted": getattr(generator, "accepted", 0),
        # What the client had measured a drafted position to cost, as a share of a one-position step.
        "position_share": generator.drafter.costs.measured_share() if generator.drafter is not None else None,
    }


@contextlib.contextmanager
def delayed_link(direct_url: str, rtt_ms: float, netem: Pair | None) -> Iterator[str]:
    """A URL of the tail service with ``rtt_ms`` added: netem on the veth pair, else through the delay proxy."""
    if netem is not None:
        netem.set_delay(rtt_ms / 2)
        try:
            yield direct_url
        finally:
            netem.set_delay(0)
        return
    parts = urlsplit(direct_url)
    with start_proxy(f"{parts.hostname}:{parts.port}", rtt_ms / 2) as proxy:
        yield proxy.url


def progress(message: str, *args: object) -> None:
    log.info("wan: " + message, *args)


def measure_local(bundle: Path, prompts: list[Prompt], new_tokens: int) -> dict:
    """Head + tail in this process: each prompt's prefill (median of a few) and decode with speculation off/on."""
    rows = []
    splits = {mode: open_split(bundle, "http://127.0.0.1:9", mode == "on", new_tokens, local=True)
              for mode in ("off", "on")}
    try:
        for split in splits.values():
            run_turn(split, encode(split, prompts[0].text), WARMUP_TOKENS, stop_ids(split))
        for prompt in prompts:
            split = splits["off"]
            ids = encode(split, prompt.text)
            prefill = statistics.median(run_turn(split, ids, 1, ())["ttft_s"] for _ in range(LOCAL_PREFILL_REPEATS))
            row = {"kind": prompt.kind, "prompt": prompt.index, "prompt_tokens": len(ids), "prefill_s": prefill}
            for mode, split in splits.items():
                turn = run_turn(split, ids, new_tokens, stop_ids(split))
                row[mode] = {k: turn[k] for k in ("tokens", "ids", "ttft_s", "decode_s", "drafted", "accepted")}
            rows.append(row)
            progress("local %s #%d: prompt %d tokens, prefill %.0f ms, decode %.1f / %.1f tok/s (off / on)",
                     prompt.kind, prompt.index, len(ids), prefill * 1000,
                     rate(row["off"]), rate(row["on"]))
    finally:
        for split in splits.values():
            split.close()
    return {"rows": rows}


def rate(turn: dict) -> float:
    return (turn["tokens"] - 1) / turn["decode_s"] if turn["tokens"] > 1 and turn["decode_s"] > 0 else 0.0


def measure_ttft32(bundle: Path, direct_url: str) -> dict:
    """Time to first token of a 32-token prompt: (b) one graph, (c) split in process, split over the direct link."""
    from splitcore.manifest import load_bundle

    ids = prompt_ids(load_bundle(bundle / "client", "client"), 32)
    result: dict = {"prompt_tokens": len(ids), "repeats": TTFT32_REPEATS}
    if (bundle / "full").is_dir():
        from bench.engines import OnnxFull

        engine = OnnxFull(bundle)
        times = []
        for _ in range(TTFT32_REPEATS + 1):
            started = time.perf_counter()
            seen: list[float] = []
            engine.generate(ids, 1, lambda _token, seen=seen: seen.append(time.perf_counter()))
            times.append(seen[0] - started)
        result["b_full_graph_s"] = statistics.median(times[1:])
    for name, url, local in (("c_split_local_s", "http://127.0.0.1:9", True), ("split_http_s", direct_url, False)):
        split = open_split(bundle, url, True, 2, local=local)
        try:
            times = [run_turn(split, ids, 1, ())["ttft_s"] for _ in range(TTFT32_REPEATS + 1)]
        finally:
            split.close()
        result[name] = statistics.median(times[1:])
    progress("32-token prompt, time to first token: %s", ", ".join(
        f"{k.removesuffix('_s')} {v * 1000:.1f} ms" for k, v in result.items() if k.endswith("_s")))
    return result


def measure_rtt(bundle: Path, direct_url: str, rtt_ms: float, prompts: list[Prompt], new_tokens: int,
                netem: Pair | None, deadline: float, local=None) -> list[dict]:  # noqa: ANN001 - a local Split
    """Every prompt, speculation off and on, through a link with ``rtt_ms`` added; with ``local`` (a Split with the
    tail in process) each prompt's local prefill is measured right before its turns, so the time to first token is
    compared with a prefill that saw the same machine load."""
    rows = []
    with delayed_link(direct_url, rtt_ms, netem) as url:
        splits = {mode: open_split(bundle, url, mode == "on", new_tokens) for mode in ("off", "on")}
        try:
            for split in splits.values():  # connections open and graphs warm before anything is timed
                run_turn(split, encode(split, prompts[0].text), WARMUP_TOKENS, stop_ids(split))
            for n, prompt in enumerate(prompts):
                if time.monotonic() > deadline:
                    log.warning("wan: time budget spent; RTT %g ms stops after %d of %d prompts", rtt_ms, n,
                                len(prompts))
                    break
                ids = encode(splits["off"], prompt.text)
                prefill = run_turn(local, ids, 1, ())["ttft_s"] if local is not None else None
                for mode in ("off", "on") if n % 2 == 0 else ("on", "off"):
                    split = splits[mode]
                    turn = run_turn(split, ids, new_tokens, stop_ids(split))
                    rows.append({"rtt_ms": rtt_ms, "mode": mode, "kind": prompt.kind, "prompt": prompt.index,
                                 "local_prefill_s": prefill, **turn})
                    progress("RTT %g ms, %s, %s #%d: %d tokens, ttft %.0f ms%s, %.1f tok/s, %.2f tokens/round trip",
                             rtt_ms, mode, prompt.kind, prompt.index, turn["tokens"], turn["ttft_s"] * 1000,
                             "" if prefill is None else f" (local prefill {prefill * 1000:.0f} ms)", rate(turn),
                             (turn["tokens"] - 1) / max(turn["decode_steps"], 1))
        finally:
            for split in splits.values():
                split.close()
    return rows


def measure(bundle: Path, direct_url: str, rtts: Sequence[float], new_tokens: int, prompts: list[Prompt],
            netem: Pair | None = None, budget_s: float = 3600.0) -> dict:
    deadline = time.monotonic() + budget_s
    result: dict = {"bundle": str(bundle), "new_tokens": new_tokens, "rtts_ms": list(rtts),
                    "link": "netem" if netem is not None else "proxy", "runs": []}
    result["local"] = measure_local(bundle, prompts, new_tokens)
    result["ttft32"] = measure_ttft32(bundle, direct_url)
    local = open_split(bundle, "http://127.0.0.1:9", False, new_tokens, local=True)
    try:
        for rtt in rtts:
            if time.monotonic() > deadline:
                log.warning("wan: time budget spent; RTT %g ms not measured", rtt)
                continue
            result["runs"].extend(measure_rtt(bundle, direct_url, rtt, prompts, new_tokens, netem, deadline, local))
    finally:
        local.close()
    return result


def wait_ready(url: str, timeout_s: float) -> None:
    """Poll the service's /readyz until it answers 200 (bounded): it loads its graphs after it was started."""
    deadline = time.monotonic() + timeout_s
    problem = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/readyz", timeout=2) as reply:
                if reply.status == 200:
                    return
                problem = f"status {reply.status}"
        except (OSError, ValueError) as e:
            problem = str(e)
        time.sleep(0.25)
    raise RuntimeError(f"the tail service at {url} was not ready within {timeout_s:.0f} s ({problem})")


def parse_netem(text: str | None) -> Pair | None:
    """``SERVER_NS:DEV,CLIENT_NS:DEV`` (from the orchestrator, when the kernel has netem) -> a Pair."""
    if not text:
        return None
    (server_ns, server_dev), (client_ns, client_dev) = (part.split(":") for part in text.split(","))
    return Pair(server_ns, client_ns, server_dev, client_dev, True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wan.measure", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="export output directory (client/, server/[, full/])")
    p.add_argument("--server-url", required=True, help="the tail service, reached directly (no delay)")
    p.add_argument("--rtts", type=float, nargs="+", default=[0, 10, 30, 80], help="added round-trip times, ms")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=Path, default=PROMPTS_FILE)
    p.add_argument("--per-kind", type=int, default=None, help="first N prompts of each kind (default: all)")
    p.add_argument("--netem", default=None, help="SERVER_NS:DEV,CLIENT_NS:DEV: delay with tc netem there")
    p.add_argument("--budget-s", type=float, default=3600.0, help="stop starting new turns after this long")
    p.add_argument("--wait-s", type=float, default=300.0, help="how long the service may take to become ready")
    p.add_argument("--out", type=Path, required=True, help="where to write the raw results (JSON)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    try:
        wait_ready(args.server_url, args.wait_s)
        result = measure(args.bundle, args.server_url, args.rtts, args.new_tokens,
                         load_prompts(args.prompts, args.per_kind), parse_netem(args.netem), args.budget_s)
    except (RuntimeError, ValueError, SplitError) as e:
        print(f"bench.wan.measure: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
