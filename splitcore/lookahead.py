"""The tail's look-ahead: a guess at the token after the one it just sampled, for the client to draft.

Open chat repeats little of its prompt, so prompt lookup and the draft table rarely have a draft there. Where the
logits are, a linear map guesses a step further: from this position's logits over the model's most written tokens
(a shortlist, counted at export) and the token just sampled, it predicts the next position's logits over that
shortlist, and the guess is their argmax. The map is fitted at export by ridge regression on the model's own
answers (export/lookahead.py). On SmolLM2's greedy chat answers it is right about one time in five, which pays
wherever a drafted position costs a small share of a step (a tail behind a network link).

The guess comes with its chance of being right, read from how often guesses of that confidence (the softmax peak
over the shortlist) were right on greedy answers to requests it was not fitted on, and the client weighs it like any
draft (splitcore/drafting.py), asking for guesses only while one can pay for the position it costs. A wrong guess
costs one verified position; the output is what it would be without.

The map is a small ONNX graph (``lookahead.onnx``: logits [rows, vocab] and the sampled tokens [rows] in, the guess
and its confidence out), run by onnxruntime on one thread that does not spin: numpy's own matrix product would wake
BLAS threads that spin after it and take the cores from the tail's next run (SmolLM2 in process, 2 cores: 132 ->
50 tokens/s).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from splitcore.errors import ManifestError
from splitcore.providers import session_options

LOGITS = "logits"
SAMPLED = "sampled"
GUESS = "guess"
CONFIDENCE = "confidence"


class Lookahead:
    def __init__(self, path: Path, vocab: int, confidence_edges: Sequence[float], chances: Sequence[float]) -> None:
        edges, chances = np.asarray(confidence_edges, np.float64), np.asarray(chances, np.float64)
        if not (edges.ndim == 1 and chances.shape == (edges.size - 1,) and chances.size >= 1
                and np.all(np.diff(edges) > 0) and np.all((chances >= 0) & (chances <= 1))):
            raise ManifestError(f"look-ahead confidence edges must increase and each bin's chance lie in [0, 1], got "
                                f"{list(edges)[:20]} and {list(chances)[:20]}; re-run the export")
        self.edges, self.chances, self.vocab = edges, chances, vocab
        try:
            self.session = ort.InferenceSession(str(path), session_options(1, spinning=False),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            raise ManifestError(f"{path}: not a look-ahead graph ({type(e).__name__}: {str(e)[:200]}); re-run the "
                                "export") from None
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if set(inputs) != {LOGITS, SAMPLED} or inputs[LOGITS][-1] != vocab or outputs != [GUESS, CONFIDENCE]:
            raise ManifestError(f"{path}: a look-ahead graph takes {LOGITS} [rows, {vocab}] and {SAMPLED} [rows] and "
                                f"gives {GUESS} and {CONFIDENCE}; this one takes {inputs} and gives {outputs}; re-run "
                                "the export")

    def guess(self, logits: np.ndarray, sampled: np.ndarray) -> list[tuple[int, float]]:
        """For each row: ``logits`` [n, vocab] of the position a token was sampled from, ``sampled`` [n] that token
        -> (the guessed token after it, the chance the guess is right)."""
        feeds = {LOGITS: np.ascontiguousarray(logits, dtype=np.float32),
                 SAMPLED: np.asarray(sampled, dtype=np.int64).reshape(-1)}
        tokens, confidence = self.session.run([GUESS, CONFIDENCE], feeds)
        bins = np.clip(np.searchsorted(self.edges, confidence, side="right") - 1, 0, len(self.chances) - 1)
        return [(int(t), float(c)) for t, c in zip(tokens, self.chances[bins])]
