"""Compare ONNX outputs with the PyTorch reference and explain any mismatch (max diff, where, values side by side).

Export runs this on every bundle it writes and fails instead of warning; the tests use the same report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitcore.errors import SplitError

# optimum-onnx's tolerances: |onnx - torch| <= atol + rtol * |torch| elementwise. The rtol term matters for
# random-weight models whose activations reach the hundreds, where fp32 itself only resolves ~3e-5.
FP32_ATOL = 1e-4
FP32_RTOL = 1e-4


def hidden_atol(reference: np.ndarray) -> float:
    """atol for hidden states: 1e-4 of their RMS where that exceeds 1.

    Residual streams of random-weight models (init range 0.5) reach several hundred, where float32 itself only
    resolves ~3e-5 and cancellation in the residual adds leaves ~1e-4 on small entries of a large vector. SmolLM2's
    outlier channels put its RMS near 10 (atol 1e-3).
    """
    rms = float(np.sqrt(np.mean(np.square(reference, dtype=np.float64))))
    return FP32_ATOL * max(1.0, rms)
# fp16 graphs are compared with the fp32 reference: the drift is bounded relative to the logit scale, and the
# greedy choice must agree almost everywhere (ties within the drift may flip).
FP16_RELATIVE_DRIFT = 2e-2
FP16_MIN_ARGMAX_AGREEMENT = 0.95
# Quantized weights are judged on what users notice, over a fixed held-out text: perplexity relative to PyTorch fp32
# and the greedy token under teacher forcing. The floors hold for trained checkpoints (SmolLM2-135M measured:
# see docs/performance.md). Random-weight models (random:*) are recorded, not gated: their huge, peaked logits make
# any rounding flip the argmax, which says nothing about a real model.
QUANTIZED_ORDER = ("int8", "int4-mlp", "int4")
QUALITY_FLOORS = {
    "int8": {"max_perplexity_ratio": 1.02, "min_greedy_agreement": 0.95},
    "int4-mlp": {"max_perplexity_ratio": 1.10, "min_greedy_agreement": 0.80},
    "int4": {"max_perplexity_ratio": 1.10, "min_greedy_agreement": 0.80},
}


class ParityError(SplitError):
    """ONNX and PyTorch disagree beyond the stated tolerance."""


@dataclass(frozen=True)
class Diff:
    name: str
    max_abs: float
    worst_excess: float
    where: tuple[int, ...]
    scale: float
    actual: np.ndarray
    expected: np.ndarray

    def report(self, atol: float, rtol: float) -> str:
        flat_a = self.actual.reshape(-1)[:6]
        flat_e = self.expected.reshape(-1)[:6]
        side = "\n".join(f"    {a: .6f}  {e: .6f}  {a - e: .2e}" for a, e in zip(flat_a, flat_e))
        return (
            f"{self.name}: max abs diff {self.max_abs:.3e}, beyond atol {atol:.0e} + rtol {rtol:.0e} * |torch| "
            f"at index {self.where} "
            f"(onnx {self.actual[self.where]:.6f} vs torch {self.expected[self.where]:.6f}; "
            f"|torch| max {self.scale:.3g})\n"
            f"  first values (onnx, torch, diff):\n{side}\n"
            "  hint: re-run the export; if it persists, the graph and the transformers model disagree"
        )


def diff(name: str, actual: np.ndarray, expected: np.ndarray, atol: float = FP32_ATOL, rtol: float = FP32_RTOL) -> Diff:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ParityError(f"{name}: onnx shape {actual.shape} != torch shape {expected.shape}")
    delta = np.abs(actual - expected)
    excess = delta - (atol + rtol * np.abs(expected))
    where = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), excess.shape))
    return Diff(name, float(delta.max()), float(excess[where]), where, float(np.abs(expected).max()), actual, expected)


def assert_close(
    name: str, actual: np.ndarray, expected: np.ndarray, atol: float = FP32_ATOL, rtol: float = FP32_RTOL
) -> float:
    """Raise ParityError with a readable report when ``|actual - expected| > atol + rtol * |expected|`` anywhere."""
    d = diff(name, actual, expected, atol, rtol)
    if not d.worst_excess <= 0:
        raise ParityError(d.report(atol, rtol))
    return d.max_abs


def argmax_agreement(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.mean(np.argmax(actual, axis=-1) == np.argmax(expected, axis=-1)))


def check_quality(quality: dict, scheme: str, source: str) -> dict:
    """Gate quantized weights on the held-out quality report; returns the floors applied (or why none were)."""
    floors = QUALITY_FLOORS[scheme]
    ratio = quality["perplexity"] / quality["reference_perplexity"]
    applied = {"scheme": scheme, "perplexity_ratio": ratio, **floors, "gated": source != "random"}
    if source == "random":
        return {"quality_floors": {**applied, "note": "random weights: recorded, not gated"}}
    if not ratio <= floors["max_perplexity_ratio"]:
        raise ParityError(
            f"{scheme} weights: held-out perplexity {quality['perplexity']:.3f} is {ratio:.3f}x PyTorch fp32's "
            f"{quality['reference_perplexity']:.3f}, the floor is {floors['max_perplexity_ratio']}x; "
            f"{_finer(scheme)}"
        )
    if not quality["greedy_agreement"] >= floors["min_greedy_agreement"]:
        raise ParityError(
            f"{scheme} weights: greedy token agrees with PyTorch fp32 at {quality['greedy_agreement']:.1%} of held-out "
            f"positions, the floor is {floors['min_greedy_agreement']:.0%}; {_finer(scheme)}"
        )
    return {"quality_floors": applied}


def _finer(scheme: str) -> str:
    """The advice after ``scheme`` failed its floors: the schemes that round less."""
    finer = [*reversed(QUANTIZED_ORDER[: QUANTIZED_ORDER.index(scheme)]), "fp32"]
    listed = ", ".join(finer[:-1]) + " or " if len(finer) > 1 else ""
    return f"export with --weights {listed}fp32"
