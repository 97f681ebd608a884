"""Check freshly exported bundles against the transformers model they came from, through the runtime users run.

Parity (float weights): two sequences of different lengths in one KV pool, prompts fed in chunks (an empty past, a
multi-token chunk after a cached prefix, single tokens), then decode steps of both rows in one batched run; every
output must equal one full PyTorch forward of its row.

Quality (quantized weights): perplexity on a fixed held-out text (export/data/heldout.txt), teacher-forced greedy
agreement with PyTorch fp32 and the worst logit drift, gated by the floors in export/parity.py.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

from export import parity
from splitcore.graphs import FullRunner, HeadRunner, LmHeadRunner, TailRunner
from splitcore.manifest import Bundle

log = logging.getLogger(__name__)

PROMPTS = (9, 6)  # two rows of different lengths
CHUNKS = ((0, 5), (5, 6), (6, 9))  # a prefill, one single-token step, one multi-token chunk after a cached prefix
DECODE_STEPS = 3
HELDOUT = Path(__file__).parent / "data" / "heldout.txt"
HELDOUT_TOKENS = 256


def _rows(vocab_size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, length + DECODE_STEPS, dtype=np.int64) for length in PROMPTS]


def _torch_forward(model: torch.nn.Module, ids: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids[None, :]), output_hidden_states=True)
    return out.hidden_states[layer][0].float().numpy(), out.logits[0].float().numpy()


def _check_fp32_logits(name: str, logits: np.ndarray, reference: np.ndarray, model: torch.nn.Module,
                       rows: list[np.ndarray]) -> dict:
    """Logits within 1e-4 + 1e-4 * |PyTorch fp32| elementwise; where that fails, within the same of PyTorch in float64
    plus what PyTorch's own fp32 logits miss float64 by there (some random checkpoints: residual streams in the
    hundreds, which float32 resolves to ~1e-4 and PyTorch fp32 misses by ~2e-4). That second reference needs a float64
    copy of the model, made only then; the first failure is the one reported."""
    try:
        parity.assert_close(name, logits, reference)
        return {}
    except parity.ParityError as first:
        exact = np.concatenate(_float64_logits(model, rows))
        torch_error = float(np.abs(reference - exact).max())
        atol = parity.FP32_ATOL + torch_error
        if parity.diff(name, logits, exact, atol).worst_excess > 0:
            raise first from None
        log.info("%s: within %.1e of PyTorch in float64, where PyTorch fp32 itself is %.1e off", name, atol,
                 torch_error)
        return {"logits_reference": "float64", "logits_atol": atol, "torch_fp32_logits_error": torch_error}


def _float64_logits(model: torch.nn.Module, rows: list[np.ndarray]) -> list[np.ndarray]:
    """Each row's logits from one float64 copy of the model (freed on return)."""
    exact = copy.deepcopy(model).to(torch.float64)
    with torch.no_grad():
        return [exact(input_ids=torch.from_numpy(ids[None, :])).logits[0].numpy() for ids in rows]


class _Split:
    """The exported split as the user runs it: head, tail and (private output) the client's LM head."""

    def __init__(self, client: Bundle, server: Bundle) -> None:
        cpu = ["CPUExecutionProvider"]
        self.head, self.tail = HeadRunner(client, cpu), TailRunner(server, cpu)
        self.lm_head = LmHeadRunner(client, cpu) if client.manifest.output_mode == "hidden" else None

    def logits(self, tail_output: np.ndarray) -> np.ndarray:
        return tail_output if self.lm_head is None else self.lm_head.forward(tail_output)


def run_rows(split: _Split, rows: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Prompts chunk by chunk in slots 0 and 1, then batched decode steps; per row its hidden states and logits."""
    longest = max(len(r) for r in rows)
    head_pool, tail_pool = split.head.new_pool(len(rows), longest), split.tail.new_pool(len(rows), longest)
    hidden: list[list[np.ndarray]] = [[] for _ in rows]
    logits: list[list[np.ndarray]] = [[] for _ in rows]
    for slot, (row, prompt) in enumerate(zip(rows, PROMPTS)):
        head_pool.acquire(), tail_pool.acquire()
        for start, end in CHUNKS:
            end = min(end, prompt)
            if start >= end:
                continue
            h = split.head.forward(row[None, start:end], head_pool, slot)
            hidden[slot].append(h[0])
            logits[slot].append(split.logits(split.tail.forward(h, tail_pool, slot, logits_to_keep=0))[0])
    slots = list(range(len(rows)))
    for step in range(DECODE_STEPS):
        ids = np.array([[row[prompt + step]] for row, prompt in zip(rows, PROMPTS)], dtype=np.int64)
        h = split.head.decode(ids, head_pool, slots)
        out = split.logits(split.tail.decode_rows(h, tail_pool, slots))
        for slot in slots:
            hidden[slot].append(h[slot])
            logits[slot].append(out[slot])
    return [np.concatenate(h, 0) for h in hidden], [np.concatenate(lg, 0) for lg in logits]


def validate(model: torch.nn.Module, client: Bundle, server: Bundle, seed: int = 0) -> dict:
    """Returns what was measured; raises ParityError past the tolerance or below the floors of the weights."""
    manifest = client.manifest
    k = manifest.split_layer
    split = _Split(client, server)
    rows = _rows(manifest.model.vocab_size, seed)
    got_hidden, got_logits = run_rows(split, rows)
    refs = [_torch_forward(model, row, k) for row in rows]
    ref_hidden = np.concatenate([r[0] for r in refs])
    ref_logits = np.concatenate([r[1] for r in refs])
    hidden, logits = np.concatenate(got_hidden), np.concatenate(got_logits).astype(np.float32)
    results = {
        "parity_check": {"rows": list(PROMPTS), "chunks": [list(c) for c in CHUNKS], "batched_decode_steps":
                         DECODE_STEPS},
        "hidden_states_max_abs_diff": parity.diff("hidden_states", hidden, ref_hidden).max_abs,
        "logits_max_abs_diff": parity.diff("logits", logits, ref_logits).max_abs,
        "argmax_agreement": parity.argmax_agreement(logits, ref_logits),
    }
    weights = {manifest.head.weights, manifest.tail.weights}
    quantized = weights & set(parity.QUANTIZED_ORDER)
    results["quality"] = quality(model, split, client)
    if quantized:
        results.update(parity.check_quality(results["quality"], max(quantized, key=parity.QUANTIZED_ORDER.index),
                                            manifest.model.source))
    elif manifest.tail.dtype == "float32":
        results["atol"], results["rtol"] = parity.FP32_ATOL, parity.FP32_RTOL
        results["hidden_states_atol"] = parity.hidden_atol(ref_hidden)
        parity.assert_close("head hidden_states", hidden, ref_hidden, results["hidden_states_atol"])
        results.update(_check_fp32_logits("tail logits", logits, ref_logits, model, rows))
    else:
        results.update(_check_fp16(logits, ref_logits, results["argmax_agreement"], "tail logits"))
    log.info("parity: hidden max diff %.2e, logits max diff %.2e, argmax agreement %.0f%%; held-out perplexity %.3g "
             "(PyTorch fp32 %.3g)", results["hidden_states_max_abs_diff"], results["logits_max_abs_diff"],
             100 * results["argmax_agreement"], results["quality"]["perplexity"],
             results["quality"]["reference_perplexity"])
    return results


def heldout_ids(client: Bundle) -> np.ndarray:
    """The held-out text as token ids, with the bundle's own tokenizer (a byte tokenizer for random models)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(client.path(client.manifest.tokenizer.file)))
    # Within the model's positions (a model of 64 positions gets its first 64).
    within = min(HELDOUT_TOKENS, client.manifest.model.max_position_embeddings)
    ids = tokenizer.encode(HELDOUT.read_text(), add_special_tokens=False).ids[:within]
    vocab = client.manifest.model.vocab_size
    return np.asarray([i % vocab for i in ids], dtype=np.int64)


def quality(model: torch.nn.Module, split: _Split, client: Bundle) -> dict:
    """Perplexity of the split and of PyTorch fp32 on the held-out text, greedy agreement, worst logit drift."""
    ids = heldout_ids(client)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids[None, :])).logits[0].float().numpy()
    hidden = split.head.forward(ids[None, :], split.head.new_cache(len(ids)))
    got = split.logits(split.tail.forward(hidden, split.tail.new_cache(len(ids)), logits_to_keep=0))[0]
    got = got.astype(np.float32)
    return {
        "tokens": int(len(ids)),
        "perplexity": perplexity(got, ids),
        "reference_perplexity": perplexity(ref, ids),
        "greedy_agreement": parity.argmax_agreement(got[:-1], ref[:-1]),
        "max_abs_logit_drift": float(np.abs(got - ref).max()),
        "mean_abs_logit_drift": float(np.abs(got - ref).mean()),
    }


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean negative log-likelihood of each next token)."""
    scores = logits[:-1].astype(np.float64)
    peak = scores.max(axis=-1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(scores - peak).sum(axis=-1))
    nll = log_norm - scores[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def validate_full(model: torch.nn.Module, full: Bundle, seed: int = 0) -> dict:
    """The unsplit graph through the same chunks: logits must equal one PyTorch forward."""
    manifest = full.manifest
    runner = FullRunner(full, ["CPUExecutionProvider"])
    row = _rows(manifest.model.vocab_size, seed)[0]
    cache = runner.new_cache(len(row))
    parts = [runner.forward(row[None, start:end], cache, logits_to_keep=0)[0] for start, end in CHUNKS]
    logits = np.concatenate(parts).astype(np.float32)
    ref = _torch_forward(model, row[: CHUNKS[-1][1]], 0)[1]
    results = {"logits_max_abs_diff": parity.diff("logits", logits, ref).max_abs,
               "argmax_agreement": parity.argmax_agreement(logits, ref)}
    if manifest.full.weights in parity.QUANTIZED_ORDER:
        return results
    if manifest.full.dtype == "float32":
        results["atol"], results["rtol"] = parity.FP32_ATOL, parity.FP32_RTOL
        results.update(_check_fp32_logits("full logits", logits, ref, model, [row[: CHUNKS[-1][1]]]))
    else:
        results.update(_check_fp16(logits, ref, results["argmax_agreement"], "full logits"))
    log.info("full graph parity ok: logits max diff %.2e", results["logits_max_abs_diff"])
    return results


def _check_fp16(logits: np.ndarray, ref_logits: np.ndarray, agreement: float, name: str) -> dict:
    scale = float(np.abs(ref_logits).max())
    limit = parity.FP16_RELATIVE_DRIFT * scale
    parity.assert_close(f"{name} (fp16 vs fp32)", logits, ref_logits, limit, 0.0)
    if agreement < parity.FP16_MIN_ARGMAX_AGREEMENT:
        raise parity.ParityError(
            f"fp16 greedy choice agrees with fp32 at {agreement:.0%} of positions, "
            f"expected >= {parity.FP16_MIN_ARGMAX_AGREEMENT:.0%}"
        )
    return {"atol": limit, "rtol": 0.0, "min_argmax_agreement": parity.FP16_MIN_ARGMAX_AGREEMENT}


def torch_greedy(model: torch.nn.Module, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy continuation of one prompt with the KV cache; EOS is just another token here."""
    ids, past, out = torch.from_numpy(prompt), None, []
    with torch.no_grad():
        for _ in range(new_tokens):
            step = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = step.past_key_values
            ids = step.logits[:, -1:].argmax(-1)
            out.append(int(ids))
    return np.asarray(out, dtype=np.int64)
