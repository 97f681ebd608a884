"""``python -m bench``: every configuration in one process tree, in alternation, after warm-up.

    python -m bench                # full: SmolLM2 and random:tinyllama, prompts 32 and 512, 128 new tokens
    python -m bench --quick        # CI: random:tiny, one short prompt, few tokens (well under 2 minutes)

Each configuration runs in its own worker process (peak RSS is per process); round r runs every configuration
once per prompt length before round r + 1 starts, so slow drift of a shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from bench import bundles as bench_bundles
from bench import machine, report
from bench.engines import CONFIGS
from bench.int8_head import int8_report
from bench.prompts import prompt_ids
from bench.roofline import weight_bytes_per_token
from bench.summary import summarize
from bench.workers import Worker
from splitcore.errors import SplitError
from splitcore.manifest import load_bundle

log = logging.getLogger("bench")

FULL = {"models": ["smollm2:4", "random:tinyllama:4"], "prompt_lengths": [32, 512], "new_tokens": 128,
        "repeats": 3}
QUICK = {"models": ["random:tiny:2"], "prompt_lengths": [32], "new_tokens": 16, "repeats": 2}
WARMUP_TOKENS = 4
# Workers of one model stay loaded together when their weights fit this share of the available memory; otherwise
# each round starts and stops them one at a time (slower, same alternation).
RESIDENT_MEMORY_SHARE = 0.6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark the split against the alternatives.")
    p.add_argument("--quick", action="store_true", help="tiny model, few tokens: a CI smoke run")
    p.add_argument("--models", nargs="+", default=None, help="MODEL:K entries (default: by mode)")
    p.add_argument("--prompt-lengths", nargs="+", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="measured runs per configuration and prompt length")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--bundles-dir", type=Path, default=Path("bundles/bench"), help="where exports are kept")
    p.add_argument("--bundle", type=Path, default=None, help="use this --full export (one model) instead")
    p.add_argument("--int8-bundle", type=Path, default=None, help="with --bundle: its int8-head export")
    p.add_argument("--out", type=Path, default=Path("reports/bench"), help="report directory")
    p.add_argument("--seed", type=int, default=0, help="seed of random:* weights (must match the export)")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    for name, default in mode.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.bundle is not None and len(args.models) != 1:
        p.error("--bundle stands for one model; give one --models entry")
    return args


def model_bundles(args: argparse.Namespace, entry: str) -> bench_bundles.ModelBundles:
    model, _, k = entry.rpartition(":")
    if not model or not k.isdigit():
        raise SplitError(f"--models entries are MODEL:K (e.g. smollm2:4), got {entry!r}")
    if args.bundle is not None:
        return bench_bundles.ModelBundles(model, args.bundle, args.int8_bundle)
    return bench_bundles.prepare(model, int(k), args.bundles_dir, int8="c8" in args.configs)


def bench_model(args: argparse.Namespace, found: bench_bundles.ModelBundles, bandwidth_gb_s: float,
                skipped: dict) -> dict:
    manifest = load_bundle(found.split / "client", "client", verify=False).manifest
    model = manifest.model
    configs = [c for c in args.configs if c not in skipped and not (c == "c8" and found.int8 is None)]
    prompts = {n: prompt_ids(load_bundle(found.split / "client", "client"), n) for n in args.prompt_lengths}
    weights = {c: weight_bytes_per_token(model, manifest.split_layer, 1.0 if c == "c8" else 4.0) for c in configs}
    resident = len(configs) * weights["c" if "c" in weights else configs[0]] < (
        RESIDENT_MEMORY_SHARE * machine.available_memory_bytes())
    log.info("%s: configurations %s, %s", model.id, ", ".join(configs),
             "loaded together" if resident else "loaded one at a time (memory)")

    samples: dict[tuple[str, int], list[dict]] = {}
    workers: dict[str, Worker] = {}
    total = args.repeats * len(configs) * len(prompts)
    done = 0
    try:
        for r in range(args.repeats):
            for config in configs:
                worker = workers.get(config) or _start(config, found, args, prompts)
                for length, ids in prompts.items():
                    result = worker.run(ids, args.new_tokens)
                    samples.setdefault((config, length), []).append(result)
                    done += 1
                    log.info("[%d/%d] round %d %-24s prompt %4d: ttft %6.0f ms, decode %6.1f tok/s", done, total,
                             r + 1, CONFIGS[config].label, length, 1000 * result["ttft_s"],
                             (args.new_tokens - 1) / max(result["decode_s"], 1e-9))
                if resident:
                    workers[config] = worker
                else:
                    worker.close()
    finally:
        for worker in workers.values():
            worker.close()

    reference = "b" if "b" in configs else configs[0]
    runs = [
        summarize(c, samples[(c, n)], weights[c], bandwidth_gb_s, samples[(reference, n)][0]["tokens"])
        for n in prompts for c in configs
    ]
    result = {
        "model": model.id,
        "split_layer": manifest.split_layer,
        "num_layers": model.num_layers,
        "reference_config": reference,
        "kv_bytes_per_token": {
            "client": manifest.kv_bytes_per_token(manifest.head),
            "server": manifest.kv_bytes_per_token(manifest.tail),
            "whole model": manifest.kv_bytes_per_token(manifest.head) + manifest.kv_bytes_per_token(manifest.tail),
        },
        "runs": runs,
    }
    if found.int8_missing:
        result["int8_head_missing"] = found.int8_missing
    if found.int8 is not None and "c8" in configs:
        log.info("%s: int8 head accuracy and speed", model.id)
        result["int8_head"] = int8_report(found.split, found.int8)
    return result


def _start(config: str, found: bench_bundles.ModelBundles, args: argparse.Namespace, prompts: dict) -> Worker:
    log.info("starting %s", CONFIGS[config].label)
    worker = Worker(config, found.split, found.int8, found.model, args.seed)
    for ids in prompts.values():
        worker.run(ids, WARMUP_TOKENS)
    return worker


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    skipped = {c: reason for c in args.configs if (reason := CONFIGS[c].unavailable())}
    for key, reason in skipped.items():
        log.warning("%s %s", CONFIGS[key].label, reason)
    found = [model_bundles(args, entry) for entry in args.models]
    log.info("measuring memory bandwidth")
    bandwidth = machine.memory_bandwidth()
    log.info("memory bandwidth %.1f GB/s", bandwidth["best_gb_s"])
    results = {
        "machine": machine.describe(),
        "bandwidth": bandwidth,
        "settings": {"quick": args.quick, "prompt_lengths": args.prompt_lengths, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "warmup_tokens": WARMUP_TOKENS, "configs": args.configs},
        "configs": {k: {"label": c.label, "description": c.description} for k, c in CONFIGS.items()},
        "skipped": skipped,
        "models": [bench_model(args, f, bandwidth["best_gb_s"], skipped) for f in found],
    }
    results["seconds"] = time.perf_counter() - started
    paths = report.write(results, args.out)
    log.info("wrote %s in %.0f s", ", ".join(str(p) for p in paths.values()), results["seconds"])
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        run(args)
    except SplitError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
