"""Check freshly exported bundles against the transformers model they came from, through the runtime users run.

The check covers a left-padded batch of two, an empty past, a multi-token chunk after a cached prefix and
single-token steps: the chunked ONNX run must equal one full PyTorch forward.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from export import parity
from splitcore.graphs import HeadRunner, LmHeadRunner, TailRunner, positions_for
from splitcore.manifest import Bundle

log = logging.getLogger(__name__)

PROMPT_LENGTH = 9
PADDING = 2
CHUNKS = ((0, 5), (5, 6), (6, 9))  # a prefill, one single-token step, one multi-token chunk after a cached prefix


def validate(model: torch.nn.Module, client: Bundle, server: Bundle, seed: int = 0) -> dict:
    """Returns the measured differences; raises ParityError past the tolerance for the bundle's dtype.

    In private-output mode the logits are the client's LM head applied to the tail's final hidden states: the
    check covers the split exactly as the user runs it.
    """
    manifest = client.manifest
    k = manifest.split_layer
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, manifest.model.vocab_size, (2, PROMPT_LENGTH), dtype=np.int64)
    mask = np.ones_like(input_ids)
    mask[1, :PADDING] = 0
    positions = positions_for(mask, PROMPT_LENGTH)

    with torch.no_grad():
        reference = model(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            output_hidden_states=True,
        )
    ref_hidden = reference.hidden_states[k].float().numpy()
    ref_logits = reference.logits.float().numpy()

    head, tail = HeadRunner(client, ["CPUExecutionProvider"]), TailRunner(server, ["CPUExecutionProvider"])
    lm_head = LmHeadRunner(client, ["CPUExecutionProvider"]) if manifest.output_mode == "hidden" else None
    head_cache, tail_cache = head.new_cache(2), tail.new_cache(2)
    hidden_parts, logit_parts = [], []
    for start, end in CHUNKS:
        chunk_mask = mask[:, :end]
        chunk_positions = positions[:, start:end]
        hidden = head.forward(input_ids[:, start:end], chunk_mask, chunk_positions, head_cache)
        logits = tail.forward(hidden, chunk_mask, chunk_positions, tail_cache, logits_to_keep=0)
        if lm_head is not None:
            logits = lm_head.forward(logits)
        hidden_parts.append(hidden)
        logit_parts.append(logits)
    hidden = np.concatenate(hidden_parts, axis=1).astype(np.float32)
    logits = np.concatenate(logit_parts, axis=1).astype(np.float32)

    # Padded query positions attend to nothing real: their outputs are defined by neither side, so skip them.
    real = mask.astype(bool)
    results = {
        "prompt": {"batch": 2, "length": PROMPT_LENGTH, "left_padding": PADDING, "chunks": [list(c) for c in CHUNKS]},
        "hidden_states_max_abs_diff": parity.diff("hidden_states", hidden[real], ref_hidden[real]).max_abs,
        "logits_max_abs_diff": parity.diff("logits", logits[real], ref_logits[real]).max_abs,
        "argmax_agreement": parity.argmax_agreement(logits[real], ref_logits[real]),
    }
    if manifest.dtype == "float32":
        results["atol"], results["rtol"] = parity.FP32_ATOL, parity.FP32_RTOL
        results["hidden_states_atol"] = parity.hidden_atol(ref_hidden[real])
        parity.assert_close("head hidden_states", hidden[real], ref_hidden[real], results["hidden_states_atol"])
        parity.assert_close("tail logits", logits[real], ref_logits[real])
    else:
        scale = float(np.abs(ref_logits[real]).max())
        limit = parity.FP16_RELATIVE_DRIFT * scale
        results["atol"], results["rtol"] = limit, 0.0
        results["min_argmax_agreement"] = parity.FP16_MIN_ARGMAX_AGREEMENT
        parity.assert_close("tail logits (fp16 vs fp32)", logits[real], ref_logits[real], limit, 0.0)
        if results["argmax_agreement"] < parity.FP16_MIN_ARGMAX_AGREEMENT:
            raise parity.ParityError(
                f"fp16 greedy choice agrees with fp32 at {results['argmax_agreement']:.0%} of positions, "
                f"expected >= {parity.FP16_MIN_ARGMAX_AGREEMENT:.0%}"
            )
    log.info(
        "parity ok: hidden max diff %.2e, logits max diff %.2e (atol %.0e, rtol %.0e), argmax agreement %.0f%%",
        results["hidden_states_max_abs_diff"], results["logits_max_abs_diff"], results["atol"], results["rtol"],
        100 * results["argmax_agreement"],
    )
    return results
