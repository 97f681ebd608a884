"""Write a benchmark's results as JSON, a markdown table and a PNG chart, with issue 12's ratios and floors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Issue 12's floors on SmolLM2 against llama.cpp (decode tok/s, time to first token), and on the TinyLlama shapes.
FLOORS = {"c_decode_vs_llama_cpp": (">=", 1.0), "d_decode_vs_llama_cpp": (">=", 0.9),
          "d_ttft_vs_llama_cpp": ("<=", 1.2), "head_step_fraction": ("<=", 0.25), "tail_decode_speedup": (">=", 3.0)}
FOUR_BIT = ("int4", "int4-mlp")


def write(results: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(markdown(results))
    if any(model["runs"] for model in results["models"]):  # --steps-only has no generation runs to chart
        paths["chart"] = out / "bench.png"
        chart(results, paths["chart"])
    return paths


def anchor_ratios(runs: list[dict]) -> list[dict]:
    """Per prompt length and 4-bit scheme: (c) and (d) decode over llama.cpp's, (d)'s TTFT over llama.cpp's (and
    the same against onnxruntime-genai), each with its floor and whether it is met."""
    ratios = []
    by_key = {(r["key"], r["prompt_tokens"]): r for r in runs}
    for prompt in sorted({r["prompt_tokens"] for r in runs}):
        for anchor in ("llama.cpp", "genai"):
            base = by_key.get((anchor, prompt))
            if base is None:
                continue
            for scheme in FOUR_BIT:
                c, d = by_key.get((f"c@{scheme}", prompt)), by_key.get((f"d@{scheme}", prompt))
                row = {"prompt_tokens": prompt, "anchor": anchor, "weights": scheme}
                if c:
                    row["c_decode_vs_anchor"] = _median(c, "decode_tokens_per_s") / _median(base, "decode_tokens_per_s")
                if d:
                    row["d_decode_vs_anchor"] = _median(d, "decode_tokens_per_s") / _median(base, "decode_tokens_per_s")
                    row["d_ttft_vs_anchor"] = _median(d, "ttft_s") / _median(base, "ttft_s")
                if len(row) > 3:
                    ratios.append(row)
    return ratios


def _median(row: dict, metric: str) -> float:
    return row[metric]["median"]


def meets(name: str, value: float) -> bool:
    op, floor = FLOORS[name]
    return value >= floor if op == ">=" else value <= floor


def markdown(results: dict) -> str:
    m, bw, s = results["machine"], results["bandwidth"], results["settings"]
    load = results.get("load_average")
    generated = any(model["runs"] for model in results["models"])
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; measured memory bandwidth "
        f"{bw['best_gb_s']:.1f} GB/s (numpy copy/triad, best)."
        + (f" {s['new_tokens']} new tokens, greedy, EOS ignored; medians of {s['repeats']} alternating rounds after "
           "warm-up [min-max]" if generated else " Head and tail steps only (no generation runs)")
        + (f"; load average {load[0]:.2f} at the start, {results['load_average_after'][0]:.2f} at the end"
           if load and results.get("load_average_after") else "") + ".",
        f"Command: `{results.get('command', 'python -m bench')}`",
        "",
    ]
    for model in results["models"]:
        if model["runs"]:
            lines += _runs_table(model)
    for model in results["models"]:
        lines += _ratio_lines(model)
        lines += _step_lines(model)
        kv = ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in model["kv_bytes_per_token"].items())
        lines.append(f"- {model['model']} (K = {model['split_layer']}): KV cache per session per token: {kv}.")
        for scheme, reason in model.get("missing_weights", {}).items():
            lines.append(f"- {model['model']}: no {scheme} configurations: {reason}")
        for key, reason in model.get("anchors_skipped", {}).items():
            lines.append(f"- {model['model']}: {key} {reason}")
    for key, reason in results.get("skipped", {}).items():
        lines.append(f"- ({key}) {reason}")
    return "\n".join(lines) + "\n"


def _runs_table(model: dict) -> list[str]:
    lines = [
        "| model | prompt | configuration | TTFT ms | decode tok/s | end-to-end tok/s | share of BW bound "
        "| peak RSS MiB | same tokens as (b) [same weights] |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in model["runs"]:
        ttft, dec, e2e = row["ttft_s"], row["decode_tokens_per_s"], row["end_to_end_tokens_per_s"]
        rss = ", ".join(f"{k} {v:.0f}" for k, v in row["peak_rss_mib"].items())
        agree = row["tokens_agree_with_reference"]
        lines.append(
            f"| {model['model']} | {row['prompt_tokens']} | {row['label']} "
            f"| {1000 * ttft['median']:.0f} [{1000 * ttft['min']:.0f}-{1000 * ttft['max']:.0f}] "
            f"| {dec['median']:.1f} [{dec['min']:.1f}-{dec['max']:.1f}] "
            f"| {e2e['median']:.1f} | {100 * row['bandwidth_bound_share']:.0f}% | {rss} "
            f"| {'-' if agree is None else f'{100 * agree:.0f}%'} |"
        )
    return lines + [""]


def _ratio_lines(model: dict) -> list[str]:
    lines = []
    for r in model.get("ratios", []):
        parts = []
        for field, floor_name, what in (("c_decode_vs_anchor", "c_decode_vs_llama_cpp", "(c) decode"),
                                        ("d_decode_vs_anchor", "d_decode_vs_llama_cpp", "(d) decode"),
                                        ("d_ttft_vs_anchor", "d_ttft_vs_llama_cpp", "(d) TTFT")):
            if field in r:
                op, floor = FLOORS[floor_name]
                verdict = (" (meets" if meets(floor_name, r[field]) else " (misses") + f" {op} {floor:g})"
                parts.append(f"{what} {r[field]:.2f}x" + (verdict if r["anchor"] == "llama.cpp" else ""))
        lines.append(f"- {model['model']}, prompt {r['prompt_tokens']}, {r['weights']} split vs {r['anchor']}: "
                     + "; ".join(parts) + ".")
    return lines


def _step_lines(model: dict) -> list[str]:
    steps = model.get("steps")
    if not steps:
        return []
    lines = []
    for scheme, v in steps["schemes"].items():
        q = v.get("quality") or {}
        floors = v.get("quality_floors") or {}
        quality = ""
        if q and scheme != "fp32":
            ratio = q["perplexity"] / q["reference_perplexity"] if q.get("reference_perplexity") else float("nan")
            quality = (f"; held-out perplexity {ratio:.3f}x fp32, greedy agreement {100 * q['greedy_agreement']:.1f}%"
                       + (f" ({floors['note']})" if floors.get("note") else ""))
        lines.append(f"- {model['model']} {scheme}: head step {v['head_step_ms']:.2f} ms, tail step "
                     f"{v['tail_step_ms']:.2f} ms (after {steps['prefix_tokens']} tokens, median of "
                     f"{steps['timed_steps']}); head {v['head_file_bytes'] / 2**20:.1f} MiB, tail "
                     f"{v['tail_file_bytes'] / 2**20:.1f} MiB{quality}.")
    for scheme, r in steps.get("vs_fp32", {}).items():
        head, tail = f"{r['head_step_fraction']:.2f}x", f"{r['tail_decode_speedup']:.2f}x"
        if scheme == "int4":  # issue 12's floors are stated for int4
            head += " (" + ("meets" if meets("head_step_fraction", r["head_step_fraction"]) else "misses") + " <= 0.25)"
            tail += " (" + ("meets" if meets("tail_decode_speedup", r["tail_decode_speedup"]) else "misses") + " >= 3)"
        lines.append(f"- {model['model']} {scheme} vs fp32: head step {head} of fp32's, tail decode {tail} faster.")
    return lines


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(m["model"], p) for m in results["models"] for p in sorted({r["prompt_tokens"] for r in m["runs"]})]
    labels = list(dict.fromkeys(r["label"] for m in results["models"] for r in m["runs"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    width = 0.8 / max(1, len(labels))
    colors = plt.get_cmap("tab20")
    for ax, metric, title, scale in ((axes[0], "decode_tokens_per_s", "decode tokens/s (higher is better)", 1),
                                     (axes[1], "ttft_s", "time to first token, ms (lower is better)", 1000)):
        for i, label in enumerate(labels):
            values, low, high = [], [], []
            for model, prompt in groups:
                rows = [r for m in results["models"] if m["model"] == model for r in m["runs"]
                        if r["label"] == label and r["prompt_tokens"] == prompt]
                spread = rows[0][metric] if rows else {"median": 0, "min": 0, "max": 0}
                values.append(scale * spread["median"])
                low.append(scale * (spread["median"] - spread["min"]))
                high.append(scale * (spread["max"] - spread["median"]))
            ax.bar([g + i * width for g in range(len(groups))], values, width, yerr=[low, high], capsize=2,
                   error_kw={"elinewidth": 0.8}, label=label, color=colors(i % 20))
        ax.set_xticks([g + width * (len(labels) - 1) / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{m}\nprompt {p}" for m, p in groups], fontsize=8)
        ax.set_title(title + ", median [min-max]", fontsize=10)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{results['machine']['cpu']} ({results['machine']['cores']} cores), "
                 f"{results['settings']['new_tokens']} tokens, {results['settings']['repeats']} rounds", fontsize=9)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * ((len(labels) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
