"""Turn raw per-run results into medians and spread, and compare each configuration's tokens with the baseline."""

from __future__ import annotations

import statistics

from bench.engines import run_key, run_label
from bench.roofline import bandwidth_share


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(config: str, weights: str, samples: list[dict], weight_bytes: float, bandwidth_gb_s: float,
              reference_tokens: list[int] | None) -> dict:
    n = samples[0]["new_tokens"]
    decode = [(n - 1) / s["decode_s"] for s in samples if s["decode_s"] > 0]
    row = {
        "key": run_key(config, weights),
        "config": config,
        "weights": weights,
        "label": run_label(config, weights),
        "prompt_tokens": samples[0]["prompt_tokens"],
        "new_tokens": n,
        "ttft_s": spread([s["ttft_s"] for s in samples]),
        "decode_tokens_per_s": spread(decode),
        "end_to_end_tokens_per_s": spread([n / s["total_s"] for s in samples]),
        "weight_bytes_per_token": weight_bytes,
        "bandwidth_bound_share": bandwidth_share(weight_bytes, statistics.median(decode), bandwidth_gb_s),
        "peak_rss_mib": {role: max((s["peak_rss_bytes"].get(role) or 0) for s in samples) / 2**20
                         for role in samples[0]["peak_rss_bytes"]},
        "tokens_agree_with_reference": _agreement(samples[0]["tokens"], reference_tokens),
    }
    if "traffic_bytes" in samples[0]:
        row["traffic_bytes_per_token"] = {k: v / n for k, v in samples[0]["traffic_bytes"].items()}
    return row


def _agreement(tokens: list[int], reference: list[int] | None) -> float | None:
    """Length of the common greedy prefix as a share of the tokens (1.0: identical output)."""
    if reference is None:
        return None
    same = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        same += 1
    return same / len(reference)
