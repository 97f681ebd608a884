"""``python -m export``: cut a Llama-family model at layer K into a client bundle and a server bundle.

    python -m export --model smollm2 --split-layer 4 --out bundles/smollm2-k4

``--weights int4`` stores every matrix multiplication in 4-bit blocks (8-bit for the LM head), ``--full`` also writes
the unsplit model as one graph into ``<out>/full`` (the baseline benchmarks compare with).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from export import bundle as bundles
from export.cleanup import removed_on_failure
from export.draft_table import DEFAULT_TOKENS, TABLE_FILE, greedy_answers, sample_answers, write_draft_table
from export.graph_builder import GRAPH_REVISION, GraphBuilder, graph_spec, save
from export.lookahead import LOOKAHEAD_FILE, write_lookahead
from export.matmul_weights import FLOAT_SCHEMES, QUANTIZED_SCHEMES, MatMulWeights
from export.sources import accepted_models, load_model
from export.tail_drafts import write_tail_drafts
from export.validate import validate, validate_full
from splitcore import names
from splitcore.drafting import DraftTable
from splitcore.errors import SplitError
from splitcore.manifest import MANIFEST_FILE, GraphSpec, load_bundle

log = logging.getLogger("export")

DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}
WEIGHTS = FLOAT_SCHEMES + QUANTIZED_SCHEMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--model", default="smollm2", help=f"{accepted_models()} (default: %(default)s)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--split-layer", type=int, default=4, help="first layer of the tail, 1..N-1 (default: %(default)s)")
    p.add_argument("--weights", choices=WEIGHTS, default="fp32",
                   help="how matrix multiplications store their weights: fp32 (the exact parity reference), fp16 "
                        "(GPU tails), int8, int4-mlp (MLP gate/up 4-bit, the rest 8-bit) or int4 (LM head 8-bit); "
                        "blocks of 32 with a scale and zero point; quantized bundles must pass the quality floors on "
                        "held-out text (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="activation and KV dtype of the tail (and full) graph; fp16 is for GPU tails, the CPU head "
                        "stays fp32 (default: fp16 with --weights fp16, else fp32)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: bundles/<model>-k<K>)")
    p.add_argument("--seed", type=int, default=0, help="seed of random:* weights (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="export even if the bundle is up to date")
    p.add_argument("--full", action="store_true", help="also export the unsplit model as one graph into <out>/full")
    p.add_argument("--private-output", action="store_true",
                   help="the tail returns final hidden states and the client bundle gets the final norm + LM head "
                        "(lm_head.onnx), so the server never sees logits or output tokens")
    p.add_argument("--draft-tokens", type=int, default=None,
                   help="tokens of the model's own answers to sample for the client's draft table (n-grams the "
                        "model tends to write, drafted for speculation where the conversation has no match); 0: no "
                        f"table (default: {DEFAULT_TOKENS}, 0 for random:* models)")
    args = p.parse_args(argv)
    if args.draft_tokens is None:
        args.draft_tokens = 0 if args.model.startswith("random:") else DEFAULT_TOKENS
    if args.draft_tokens < 0:
        p.error(f"--draft-tokens must be >= 0, got {args.draft_tokens}")
    if args.dtype is None:
        args.dtype = "fp16" if args.weights == "fp16" else "fp32"
    if args.dtype == "fp16" and args.weights == "fp32":
        args.weights = "fp16"  # float weights are stored in the graph's dtype
    if args.weights == "fp16" and args.dtype != "fp16":
        p.error("--weights fp16 needs --dtype fp16 (fp16 weights in an fp32 graph would only be cast back)")
    if args.split_layer < 1:
        p.error(f"--split-layer must be in 1..N-1 (N = number of layers), got {args.split_layer}")
    if args.out is None:
        name = args.model.replace("random:", "random-").rstrip("/").split("/")[-1].removesuffix(".gguf")
        suffix = ("-fp16" if args.dtype == "fp16" else "") + (f"-{args.weights}" if args.weights in QUANTIZED_SCHEMES
                                                               else "")
        suffix += "-private" if args.private_output else ""
        args.out = Path("bundles") / f"{name}-k{args.split_layer}{suffix}"
    return args


def export_args(args: argparse.Namespace) -> dict:
    wanted = {"model": args.model, "revision": args.revision, "split_layer": args.split_layer,
              "dtype": args.dtype, "weights": args.weights, "seed": args.seed, "graph_revision": GRAPH_REVISION}
    # Recorded only when asked for.
    if args.full:
        wanted["full"] = True
    if args.private_output:
        wanted["output_mode"] = "hidden"
    if args.draft_tokens:
        wanted["draft_tokens"] = args.draft_tokens
    return wanted


def up_to_date(out: Path, wanted: dict) -> bool:
    try:
        client = load_bundle(out / bundles.CLIENT, "client")
        load_bundle(out / bundles.SERVER, "server")
        if wanted.get("full"):
            load_bundle(out / bundles.FULL, "full")
        # A table written by an older exporter (no counts; the client still reads it) is written again.
        if client.manifest.drafts is not None and not DraftTable.load(
                client.path(client.manifest.drafts.file), client.manifest.model.vocab_size).counted:
            return False
        # So is a bundle from before the tail's look-ahead, which was fitted on the same samples.
        if (client.manifest.drafts is not None and client.manifest.output_mode == "logits"
                and client.manifest.lookahead is None):
            return False
        # And one from before the tail drafted from its own samples.
        if client.manifest.output_mode == "logits" and client.manifest.tail_drafts is None:
            return False
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

    step = _Steps(5 + bool(args.full) + bool(args.private_output) + bool(args.draft_tokens))
    step("loading %s", args.model)
    loaded = load_model(args.model, args.revision, args.seed)
    if args.draft_tokens and loaded.tokenizer is None:
        raise SplitError(f"{args.model} has no tokenizer to sample a draft table with; use --draft-tokens 0")
    model = loaded.model
    n = model.config.num_hidden_layers
    if n < 2:
        raise SplitError(f"{args.model} has {n} decoder layer; a split needs at least 2 (one for the head, one for "
                         "the tail)")
    if not 1 <= args.split_layer <= n - 1:
        raise SplitError(f"--split-layer must be in 1..{n - 1} for {args.model} ({n} layers), got {args.split_layer}")

    for role in (bundles.CLIENT, bundles.SERVER, bundles.FULL):
        (args.out / role / MANIFEST_FILE).unlink(missing_ok=True)
    k, positions = args.split_layer, model.config.max_position_embeddings
    quantized = args.weights in QUANTIZED_SCHEMES
    # The head runs on the user's CPU in fp32 activations; its weights follow --weights unless those are fp16.
    head_weights = args.weights if quantized else "fp32"
    lm_weights = "int8" if quantized else args.weights

    def write(graph: str, dtype: np.dtype, weights: str, path: Path, layers: range, **build) -> GraphSpec:
        builder = GraphBuilder(model, dtype, MatMulWeights(weights), MatMulWeights(lm_weights),
                               progress=_progress(graph))
        save(builder.build(positions=positions, **build) if build else builder.build_lm_head(), path)
        has_lm_head = build.get("output") == names.LOGITS or not build
        embedding = MatMulWeights(weights).embedding(dtype, model.config.hidden_size) if build.get("embed") else None
        return graph_spec(path, layers, dtype, weights, lm_weights if has_lm_head and lm_weights != weights else None,
                          embedding)

    step("exporting head (%s weights): embedding + layers [0, %d)", head_weights, k)
    head = write("head", DTYPES["fp32"], head_weights, args.out / bundles.CLIENT / "head.onnx", range(0, k),
                 start=0, end=k, embed=True, output=names.HIDDEN_STATES)
    gc.collect()
    lm_head = None
    output = names.FINAL_HIDDEN_STATES if args.private_output else names.LOGITS
    step("exporting tail (%s, %s weights): layers [%d, %d)%s", args.dtype, args.weights, k, n,
         ", returning final hidden states" if args.private_output else " + norm + LM head")
    tail = write("tail", dtype, args.weights, args.out / bundles.SERVER / "tail.onnx", range(k, n),
                 start=k, end=n, embed=False, output=output)
    if args.private_output:
        step("exporting the client's final norm + LM head")
        lm_head = write("lm_head", dtype, lm_weights, args.out / bundles.CLIENT / "lm_head.onnx", range(n, n))
    gc.collect()
    full = None
    if args.full:
        step("exporting the unsplit model (%s, %s weights): embedding + layers [0, %d) + norm + LM head",
             args.dtype, args.weights, n)
        full = write("full", dtype, args.weights, args.out / bundles.FULL / "full.onnx", range(0, n),
                     start=0, end=n, embed=True, output=names.LOGITS)
    gc.collect()

    tokenizer = None
    if loaded.tokenizer is not None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        tokenizer = bundles.write_tokenizer(loaded.tokenizer, eos, args.out / bundles.CLIENT)
    drafts = lookahead = None
    (args.out / bundles.CLIENT / TABLE_FILE).unlink(missing_ok=True)  # what an earlier export drafted with
    (args.out / bundles.SERVER / LOOKAHEAD_FILE).unlink(missing_ok=True)
    if args.draft_tokens:
        step("sampling %d tokens of the model's own answers for the client's draft table%s", args.draft_tokens,
             "" if args.private_output else " and the tail's look-ahead")
        answers = sample_answers(model, loaded.tokenizer, tokenizer.eos_token_ids, args.draft_tokens, args.seed,
                                 progress=_progress("draft table"))
        drafts = write_draft_table(answers, args.seed, args.out / bundles.CLIENT)
        log.info("  %d token pairs from %d sampled tokens", drafts.pairs, drafts.sampled_tokens)
        if not args.private_output:  # the look-ahead reads logits, which a private-output tail never has
            longest = max((len(answer.tokens) for answer in answers), default=0)
            calibration = greedy_answers(model, loaded.tokenizer, tokenizer.eos_token_ids, max(longest, 8))
            lookahead = write_lookahead(model, answers, calibration, args.out / bundles.SERVER,
                                        progress=_progress("look-ahead"))
    tail_drafts = None
    for name in filter(None, (head.file, head.data_file)):  # what an earlier export drafted with
        (args.out / bundles.SERVER / name).unlink(missing_ok=True)
    if not args.private_output:  # the tail drafts from tokens it samples: a private-output tail samples none
        tail_drafts = write_tail_drafts(loaded.tokenizer, head, args.out / bundles.CLIENT, args.out / bundles.SERVER)
    fields = dict(
        model=bundles.model_spec(model, loaded.model_id, loaded.source, loaded.revision),
        split_layer=args.split_layer,
        head=head,
        tail=tail,
        output_mode="hidden" if args.private_output else "logits",
        lm_head=lm_head,
        generation=bundles.generation_defaults(model),
        tokenizer=tokenizer,
        drafts=drafts,
        lookahead=lookahead,
        tail_drafts=tail_drafts,
        files=bundles.file_entries(args.out, head, tail, tokenizer, full, lm_head, drafts, lookahead,
                                   tail_drafts is not None),
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
    quality = results["quality"]
    log.info(
        "parity: hidden %.2e, logits %.2e, argmax agreement %.0f%%; held-out perplexity %.3f vs PyTorch fp32 %.3f, "
        "greedy agreement %.1f%%", results["hidden_states_max_abs_diff"], results["logits_max_abs_diff"],
        100 * results["argmax_agreement"], quality["perplexity"], quality["reference_perplexity"],
        100 * quality["greedy_agreement"],
    )
    log.info("done in %.1f s, peak RSS %.0f MiB", seconds, peak_mib)


def _progress(graph: str):
    """Per-layer progress of one graph on stderr: every layer on a terminal, about every 10% in a log."""
    interactive = sys.stderr.isatty()

    def report(message: str) -> None:
        done, total = (int(x) for x in message.split()[-1].split("/"))
        if interactive:
            sys.stderr.write(f"\r  {graph}: {message}" + ("\n" if done == total else ""))
            sys.stderr.flush()
        elif done == total or done % max(1, total // 10) == 0:
            log.info("  %s: %s", graph, message)

    return report


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
        with removed_on_failure(args.out):
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
