"""Write a benchmark's results as JSON, a markdown table and a PNG chart."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def write(results: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "chart": out / "bench.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(markdown(results))
    chart(results, paths["chart"])
    return paths


def markdown(results: dict) -> str:
    m, bw = results["machine"], results["bandwidth"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; measured memory bandwidth "
        f"{bw['best_gb_s']:.1f} GB/s (numpy copy/triad, best). {results['settings']['new_tokens']} new tokens, "
        f"greedy, EOS ignored; medians of {results['settings']['repeats']} alternating runs after warm-up "
        "[min-max].",
        "",
        "| model | prompt | configuration | TTFT ms | decode tok/s | end-to-end tok/s | share of BW bound "
        "| peak RSS MiB | same tokens |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model in results["models"]:
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
    lines.append("")
    for model in results["models"]:
        kv = ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in model["kv_bytes_per_token"].items())
        lines.append(f"- {model['model']} (K = {model['split_layer']}): KV cache per session per token: {kv}.")
        q = model.get("int8_head")
        if q:
            lines.append(
                f"- {model['model']} int8 head: greedy agreement {100 * q['greedy_agreement']:.1f}% over "
                f"{q['teacher_forced_positions']} teacher-forced positions ({q['prompts']} prompts), logit drift "
                f"max {q['logit_max_abs_drift']:.3g} ({100 * q['logit_relative_drift']:.1f}% of the logit scale); "
                f"head step {q['head_step_ms']['fp32']:.2f} -> {q['head_step_ms']['int8']:.2f} ms "
                f"({q['head_step_speedup']:.2f}x), head file {q['head_file_bytes']['fp32'] / 2**20:.0f} -> "
                f"{q['head_file_bytes']['int8'] / 2**20:.0f} MiB."
            )
        if model.get("int8_head_missing"):
            lines.append(f"- {model['model']}: (c8) not run: {model['int8_head_missing']}")
    for key, reason in results.get("skipped", {}).items():
        lines.append(f"- ({key}) {reason}")
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(m["model"], p) for m in results["models"] for p in sorted({r["prompt_tokens"] for r in m["runs"]})]
    labels = sorted({r["label"] for m in results["models"] for r in m["runs"]})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(labels))
    for ax, metric, title, scale in ((axes[0], "decode_tokens_per_s", "decode tokens/s (higher is better)", 1),
                                     (axes[1], "ttft_s", "time to first token, ms (lower is better)", 1000)):
        for i, label in enumerate(labels):
            values = []
            for model, prompt in groups:
                rows = [r for m in results["models"] if m["model"] == model for r in m["runs"]
                        if r["label"] == label and r["prompt_tokens"] == prompt]
                values.append(scale * rows[0][metric]["median"] if rows else 0)
            ax.bar([g + i * width for g in range(len(groups))], values, width, label=label)
        ax.set_xticks([g + width * (len(labels) - 1) / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{m}\nprompt {p}" for m, p in groups], fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['machine']['cpu']} ({results['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
