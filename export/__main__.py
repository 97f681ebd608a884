"""``python -m export``: cut a Llama-family model at layer K into a client bundle and a server bundle.

    python -m export --model smollm2 --split-layer 4 --out bundles/smollm2-k4

``--full`` also writes the unsplit model as one graph into ``<out>/full`` (the baseline benchmarks compare with);
``--quantize-head int8`` ships an int8 head to the client.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

from export import bundle as bundles
from export.modules import GRAPH_REVISION
from export.onnx_graphs import export_full, export_head, export_lm_head, export_tail
from export.quantize import SCHEMES, quantize_head
from export.sources import load_model
from export.validate import validate, validate_full
from splitcore.errors import SplitError
from splitcore.manifest import MANIFEST_FILE, load_bundle

log = logging.getLogger("export")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (built in, offline), a hub id, a local HF directory, a .gguf file, "
                        "random:tiny or random:tinyllama (default: %(default)s)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--split-layer", type=int, default=4, help="first layer of the tail, 1..N-1 (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of the tail graph; fp16 is for GPU tails (the CPU head stays fp32)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: bundles/<model>-k<K>)")
    p.add_argument("--seed", type=int, default=0, help="seed of random:* weights (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="export even if the bundle is up to date")
    p.add_argument("--full", action="store_true", help="also export the unsplit model as one graph into <out>/full")
    p.add_argument("--quantize-head", choices=sorted(SCHEMES), default=None,
                   help="dynamically quantize the head's weights (int8: smaller and faster on CPU, within a looser "
                        "tolerance that validation states)")
    p.add_argument("--private-output", action="store_true",
                   help="the tail returns final hidden states and the client bundle gets the final norm + LM head "
                        "(lm_head.onnx), so the server never sees logits or output tokens")
    args = p.parse_args(argv)
    if args.split_layer < 1:
        p.error(f"--split-layer must be in 1..N-1 (N = number of layers), got {args.split_layer}")
    if args.out is None:
        name = args.model.replace("random:", "random-").rstrip("/").split("/")[-1].removesuffix(".gguf")
        suffix = ("-fp16" if args.dtype == "fp16" else "") + (f"-{args.quantize_head}" if args.quantize_head else "")
        suffix += "-private" if args.private_output else ""
        args.out = Path("bundles") / f"{name}-k{args.split_layer}{suffix}"
    return args


def export_args(args: argparse.Namespace) -> dict:
    wanted = {"model": args.model, "revision": args.revision, "split_layer": args.split_layer,
              "dtype": args.dtype, "seed": args.seed, "graph_revision": GRAPH_REVISION}
    # Recorded only when asked for, so bundles exported before these options existed stay up to date.
    if args.full:
        wanted["full"] = True
    if args.quantize_head:
        wanted["quantize_head"] = args.quantize_head
    if args.private_output:
        wanted["output_mode"] = "hidden"
    return wanted


def up_to_date(out: Path, wanted: dict) -> bool:
    try:
        client = load_bundle(out / bundles.CLIENT, "client")
        load_bundle(out / bundles.SERVER, "server")
        if wanted.get("full"):
            load_bundle(out / bundles.FULL, "full")
    except SplitError:
        return False
    manifest = client.manifest
    return manifest.export.get("args") == wanted and manifest.validation.get("status") == "passed"


def check_writable(out: Path, roles: tuple[str, ...]) -> None:
    try:
        for role in roles:
            (out / role).mkdir(parents=True, exist_ok=True)
            probe = out / role / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as e:
        raise SplitError(f"output directory {out} is not writable: {e.strerror}") from None


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    wanted = export_args(args)
    if not args.force and up_to_date(args.out, wanted):
        log.info("%s is up to date for these arguments (use --force to export again)", args.out)
        return
    roles = (bundles.CLIENT, bundles.SERVER) + ((bundles.FULL,) if args.full else ())
    check_writable(args.out, roles)
    dtype = DTYPES[args.dtype]

    step = _Steps(5 + bool(args.full) + bool(args.quantize_head) + bool(args.private_output))
    step("loading %s", args.model)
    loaded = load_model(args.model, args.revision, args.seed)
    model = loaded.model
    n = model.config.num_hidden_layers
    if not 1 <= args.split_layer <= n - 1:
        raise SplitError(f"--split-layer must be in 1..{n - 1} for {args.model} ({n} layers), got {args.split_layer}")

    for role in (bundles.CLIENT, bundles.SERVER, bundles.FULL):
        (args.out / role / MANIFEST_FILE).unlink(missing_ok=True)
    step("exporting head: embedding + layers [0, %d)", args.split_layer)
    # The head runs on the user's CPU, where fp32 is the fast and exact choice; --dtype is the tail's.
    head = export_head(model, args.split_layer, torch.float32, args.out / bundles.CLIENT / "head.onnx")
    gc.collect()
    tail_model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    lm_head = None
    if args.private_output:
        step("exporting tail (%s): layers [%d, %d), returning final hidden states", args.dtype, args.split_layer, n)
        tail = export_tail(tail_model, args.split_layer, dtype, args.out / bundles.SERVER / "tail.onnx", True)
        step("exporting the client's final norm + LM head")
        lm_head = export_lm_head(tail_model, dtype, args.out / bundles.CLIENT / "lm_head.onnx")
    else:
        step("exporting tail (%s): layers [%d, %d) + norm + LM head", args.dtype, args.split_layer, n)
        tail = export_tail(tail_model, args.split_layer, dtype, args.out / bundles.SERVER / "tail.onnx")
    gc.collect()
    full = None
    if args.full:
        step("exporting the unsplit model (%s): embedding + layers [0, %d) + norm + LM head", args.dtype, n)
        full = export_full(tail_model, dtype, args.out / bundles.FULL / "full.onnx")
    del tail_model
    gc.collect()
    if args.quantize_head:
        step("quantizing the head (%s)", args.quantize_head)
        head = quantize_head(head, args.out / bundles.CLIENT, args.quantize_head)

    tokenizer = None
    if loaded.tokenizer is not None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        tokenizer = bundles.write_tokenizer(loaded.tokenizer, eos, args.out / bundles.CLIENT)
    fields = dict(
        model=bundles.model_spec(model, loaded.model_id, loaded.source, loaded.revision),
        split_layer=args.split_layer,
        head=head,
        tail=tail,
        output_mode="hidden" if args.private_output else "logits",
        lm_head=lm_head,
        tokenizer=tokenizer,
        files=bundles.file_entries(args.out, head, tail, tokenizer, full, lm_head),
        tools=bundles.tool_versions(),
        export={"args": wanted, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
    if full is not None:
        fields["full"] = full
    # Validate through the runtime with a provisional manifest, then record what was measured.
    bundles.write_manifest(args.out, bundles.build_manifest(validation={"status": "pending"}, **fields))
    step("validating ONNX against PyTorch")
    client = load_bundle(args.out / bundles.CLIENT, "client")
    server = load_bundle(args.out / bundles.SERVER, "server")
    results = validate(model, client, server, args.seed)
    if full is not None:
        results["full"] = validate_full(model, load_bundle(args.out / bundles.FULL, "full"), args.seed)
    step("writing manifest")
    bundles.write_manifest(args.out, bundles.build_manifest(validation={"status": "passed", **results}, **fields))
    summary(args.out, fields["files"], results, time.perf_counter() - started)


def summary(out: Path, files: dict, results: dict, seconds: float) -> None:
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for role in (bundles.CLIENT, bundles.SERVER, bundles.FULL):
        size = sum(e["bytes"] for e in files.values() if role in e["roles"])
        if not size:
            continue
        log.info("%-6s bundle %s: %.1f MiB", role, out / role, size / 2**20)
    log.info(
        "parity: hidden %.2e, logits %.2e (atol %.2g, rtol %.0e), argmax agreement %.0f%%",
        results["hidden_states_max_abs_diff"], results["logits_max_abs_diff"], results["atol"], results["rtol"],
        100 * results["argmax_agreement"],
    )
    log.info("done in %.1f s, peak RSS %.0f MiB", seconds, peak_mib)


class _Steps:
    """Numbered progress lines with the time each step took."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.last = total, 0, time.perf_counter()

    def __call__(self, message: str, *args) -> None:
        now = time.perf_counter()
        if self.done:
            log.info("  (%.1f s)", now - self.last)
        self.done += 1
        self.last = now
        log.info(f"[{self.done}/{self.total}] {message}", *args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(message)s", stream=sys.stderr)
    # torch.onnx warns about axis renames and deprecations it made itself; nothing a user can act on.
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("torch", "onnxscript", "transformers", "onnx_ir", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = parse_args(argv)
    try:
        run(args)
    except SplitError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
