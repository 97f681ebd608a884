"""``python -m bench``: every configuration in one process tree, in alternation, after warm-up.

    python -m bench                # full: SmolLM2 and random:tinyllama, prompts 32 and 512, 128 new tokens
    python -m bench --quick        # CI: random:tiny, one short prompt, few tokens (well under 2 minutes)
    python -m bench --models smollm2:4 --prompt-lengths 32 --repeats 3     # SmolLM2 only, with the anchors
    python -m bench --steps-only --models random:tinyllama:4 --weights fp32 int4   # head/tail step per scheme

Our configurations (b, c, d) run once per weight scheme (``--weights``, each its own export); (a) is PyTorch fp32;
the anchors (llama.cpp, onnxruntime-genai int4) run on the SmolLM2 GGUF and are prepared on demand
(``bench.anchors``). Each configuration runs in its own worker process (peak RSS is per process); round r runs
every configuration once per prompt length before round r + 1 starts, so slow drift of a shared machine hits all
of them alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from bench import anchors as bench_anchors
from bench import bundles as bench_bundles
from bench import machine, report
from bench.engines import ANCHORS, CONFIGS, run_key, run_label
from bench.prompts import prompt_ids
from bench.roofline import file_bytes, weight_bytes_per_token
from bench.steps import step_report
from bench.summary import summarize
from bench.workers import Worker, WorkerError
from splitcore.errors import SplitError
from splitcore.manifest import load_bundle

log = logging.getLogger("bench")

SCHEMES = ("fp32", "fp16", "int8", "int4-mlp", "int4")
FULL = {"models": ["smollm2:4", "random:tinyllama:4"], "prompt_lengths": [32, 512], "new_tokens": 128,
        "repeats": 3, "configs": list(CONFIGS), "weights": ["fp32", "int4-mlp", "int4"]}
QUICK = {"models": ["random:tiny:2"], "prompt_lengths": [32], "new_tokens": 16, "repeats": 2,
         "configs": ["a", "b", "c", "d"], "weights": ["fp32", "int4"]}
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
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds (measured runs per configuration)")
    p.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                   help="configurations (default: all; --quick: a b c d)")
    p.add_argument("--weights", nargs="+", default=None, choices=SCHEMES,
                   help="weight schemes of (b), (c), (d), one export each (default: fp32 int4-mlp int4; --quick: "
                        "fp32 int4)")
    p.add_argument("--bundles-dir", type=Path, default=Path("bundles/bench"), help="where exports are kept")
    p.add_argument("--bundle", type=Path, action="append", default=[],
                   help="use this --full export instead of exporting (one model; repeat, one per weight scheme)")
    p.add_argument("--out", type=Path, default=Path("reports/bench"), help="report directory")
    p.add_argument("--seed", type=int, default=0, help="seed of random:* weights (must match the export)")
    p.add_argument("--steps-only", action="store_true", help="only the head/tail step per weight scheme")
    p.add_argument("--no-steps", action="store_true", help="skip the head/tail step per weight scheme")
    p.add_argument("--no-install", action="store_true",
                   help="do not pip-install or build the anchors' packages (llama-cpp-python, onnxruntime-genai)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    mode = QUICK if args.quick else FULL
    for name, default in mode.items():
        if getattr(args, name) is None:
            setattr(args, name, list(default) if isinstance(default, list) else default)
    if args.bundle and len(args.models) != 1:
        p.error("--bundle stands for one model; give one --models entry")
    if args.steps_only and args.no_steps:
        p.error("--steps-only and --no-steps exclude each other")
    if args.steps_only:
        args.configs = []
    return args


def model_bundles(args: argparse.Namespace, entry: str) -> bench_bundles.ModelBundles:
    model, _, k = entry.rpartition(":")
    if not model or not k.isdigit():
        raise SplitError(f"--models entries are MODEL:K (e.g. smollm2:4), got {entry!r}")
    if args.bundle:
        return bench_bundles.given(model, int(k), args.bundle)
    return bench_bundles.prepare(model, int(k), args.bundles_dir, args.weights)


def plan(args: argparse.Namespace, found: bench_bundles.ModelBundles, anchors: bench_anchors.Anchors,
         skipped: dict) -> list[tuple[str, str, Path]]:
    """(config, weights, path) of every measured configuration, in the order each round runs them."""
    runs = []
    for config in args.configs:
        if config in skipped or config in anchors.skipped:
            continue
        if CONFIGS[config].weighted:
            runs += [(config, w, found.by_weights[w]) for w in args.weights if w in found.by_weights]
        elif config == "llama.cpp":
            runs.append((config, CONFIGS[config].weights, anchors.gguf))
        elif config == "genai":
            runs.append((config, CONFIGS[config].weights, anchors.genai))
        else:
            runs.append((config, CONFIGS[config].weights, found.reference))
    return runs


def bytes_per_token(config: str, weights: str, path: Path, model) -> float:
    if config == "llama.cpp":
        return file_bytes(path)
    if config == "genai":
        return file_bytes(*path.glob("model.onnx*"))
    return weight_bytes_per_token(model, weights)


def bench_model(args: argparse.Namespace, found: bench_bundles.ModelBundles, bandwidth_gb_s: float,
                skipped: dict) -> dict:
    client = load_bundle(found.reference / "client", "client")
    manifest = client.manifest
    model = manifest.model
    result = {
        "model": model.id,
        "split_layer": manifest.split_layer,
        "num_layers": model.num_layers,
        "weights": list(found.by_weights),
        "missing_weights": found.missing,
        "kv_bytes_per_token": {
            "client": manifest.kv_bytes_per_token(manifest.head),
            "server": manifest.kv_bytes_per_token(manifest.tail),
            "whole model": manifest.kv_bytes_per_token(manifest.head) + manifest.kv_bytes_per_token(manifest.tail),
        },
        "runs": [],
    }
    anchors = bench_anchors.prepare(found.model, [c for c in args.configs if c in ANCHORS], args.bundles_dir,
                                    install=not args.no_install)
    result["anchors_skipped"] = anchors.skipped
    runs = plan(args, found, anchors, skipped)
    if runs:
        result["runs"] = generation_runs(args, found.model, runs, client, bandwidth_gb_s, anchors.skipped)
        result["ratios"] = report.anchor_ratios(result["runs"])
    if not args.no_steps:
        log.info("%s: head and tail step per weight scheme", model.id)
        result["steps"] = step_report(found.by_weights)
    return result


def generation_runs(args: argparse.Namespace, source: str, runs: list[tuple[str, str, Path]], client,
                    bandwidth_gb_s: float, anchors_skipped: dict) -> list[dict]:
    model = client.manifest.model
    prompts = {n: prompt_ids(client, n) for n in args.prompt_lengths}
    weights = {run_key(c, w): bytes_per_token(c, w, p, model) for c, w, p in runs}
    resident = sum(weights.values()) < RESIDENT_MEMORY_SHARE * machine.available_memory_bytes()
    log.info("%s: configurations %s, %s", model.id, ", ".join(weights),
             "loaded together" if resident else "loaded one at a time (memory)")
    samples: dict[tuple[str, int], list[dict]] = {}
    workers: dict[str, Worker] = {}
    total = args.repeats * len(runs) * len(prompts)
    done = 0
    try:
        for r in range(args.repeats):
            for config, scheme, path in list(runs):
                key = run_key(config, scheme)
                worker = workers.get(key)
                if worker is None:
                    try:
                        worker = _start(config, scheme, path, source, args.seed, prompts)
                    except WorkerError as e:
                        if config not in ANCHORS:
                            raise
                        # An anchor that installs but does not run here is skipped, as if it had not installed.
                        log.warning("%s", e)
                        anchors_skipped[config] = f"skipped: {e}"
                        runs.remove((config, scheme, path))
                        continue
                for length, ids in prompts.items():
                    result = worker.run(ids, args.new_tokens)
                    samples.setdefault((key, length), []).append(result)
                    done += 1
                    log.info("[%d/%d] round %d %-34s prompt %4d: ttft %6.0f ms, decode %6.1f tok/s", done, total,
                             r + 1, run_label(config, scheme), length, 1000 * result["ttft_s"],
                             (args.new_tokens - 1) / max(result["decode_s"], 1e-9))
                if resident:
                    workers[key] = worker
                else:
                    worker.close()
    finally:
        for worker in workers.values():
            worker.close()
    keys = [run_key(c, w) for c, w, _ in runs]

    def reference(config: str, scheme: str) -> str:
        """(b) with the same weights: the split must produce its tokens exactly; else (b) fp32."""
        same = run_key("b", scheme) if CONFIGS[config].weighted else None
        return same if same in keys else "b@fp32" if "b@fp32" in keys else keys[0]

    rows = []
    for n in prompts:
        for c, w, _ in runs:
            key, ref = run_key(c, w), reference(c, w)
            row = summarize(c, w, samples[(key, n)], weights[key], bandwidth_gb_s, samples[(ref, n)][0]["tokens"])
            row["reference"] = ref
            rows.append(row)
    return rows


def _start(config: str, weights: str, path: Path, source: str, seed: int, prompts: dict) -> Worker:
    label = run_label(config, weights)
    log.info("starting %s", label)
    worker = Worker(config, label, path, source, seed)
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
        "load_average": machine.load_average(),
        "command": " ".join(["python -m bench", *args.argv]),
        "bandwidth": bandwidth,
        "settings": {"quick": args.quick, "prompt_lengths": args.prompt_lengths, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "warmup_tokens": WARMUP_TOKENS, "configs": args.configs,
                     "weights": args.weights},
        "configs": {k: {"label": c.label, "description": c.description} for k, c in CONFIGS.items()},
        "skipped": skipped,
        "models": [bench_model(args, f, bandwidth["best_gb_s"], skipped) for f in found],
    }
    results["load_average_after"] = machine.load_average()
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
