"""``python -m privacy``: measure how much of a prompt the tail operator can recover at each split layer.

Quick mode (``--quick``) runs on random:tiny for CI; the default runs on SmolLM2 for the README. Bundles come from
``--bundles-dir`` (exported there when missing) or from ``--bundle`` export directories given one per split.
Progress goes to stderr; the report (JSON, markdown, PNG) to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from privacy import meter, report
from privacy.bundles import bundle_at, load_pair
from privacy.config import FULL, QUICK
from splitcore.errors import SplitError

log = logging.getLogger("privacy")


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m privacy", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--quick", action="store_true", help="random:tiny, small sizes: the CI run")
    p.add_argument("--model", default=None, help="export --model to attack (default: smollm2, quick: random:tiny)")
    p.add_argument("--ks", type=ints, default=None, help="split layers, comma separated (default 1,2,4,8)")
    p.add_argument("--bundle", type=Path, action="append", default=[],
                   help="an export output directory to attack (repeat, one per split; replaces --ks)")
    p.add_argument("--bundles-dir", type=Path, default=Path("bundles"),
                   help="where bundles <model>-k<K> are found or exported (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="report directory (default: reports/privacy[-quick])")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts to attack (at most the data file's)")
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--train-random", type=int, default=None, help="attacker's random-token training sequences")
    p.add_argument("--train-generated", type=int, default=None, help="attacker's self-generated training sequences")
    p.add_argument("--train-length", type=int, default=None)
    p.add_argument("--candidates", type=int, default=None, help="replay search candidates per position")
    p.add_argument("--fallback", type=int, default=None,
                   help="replay candidates tried where the first ones reproduce nothing (no noise only)")
    p.add_argument("--sigmas", type=floats, default=None, help="noise sweep, comma separated, must include 0")
    p.add_argument("--noise-k", type=int, default=None, help="split layer of the noise sweep")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path("reports") / ("privacy-quick" if args.quick else "privacy")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("torch", "onnxscript", "transformers", "onnx_ir", "httpx", "matplotlib", "splitcore.graphs"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        explicit = {}
        for path in args.bundle:
            pair = load_pair(path)
            explicit[pair[0].manifest.split_layer] = pair
        preset = QUICK if args.quick else FULL
        config = preset.with_overrides(
            model=args.model, ks=tuple(sorted(explicit)) or args.ks, prompts=args.prompts,
            max_prompt_tokens=args.max_prompt_tokens, train_random=args.train_random,
            train_generated=args.train_generated, train_length=args.train_length, candidates=args.candidates,
            fallback=args.fallback,
            sigmas=args.sigmas, noise_k=args.noise_k, seed=args.seed,
        )
        pairs = explicit or {k: bundle_at(config.model, k, args.bundles_dir) for k in config.ks}
        result = meter.run(config, pairs)
        report.write(result, args.out, time.perf_counter() - started)
    except (SplitError, ValueError) as e:
        print(f"privacy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("privacy: interrupted", file=sys.stderr)
        return 130
    log.info("done in %.1f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
