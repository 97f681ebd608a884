"""reports/wan/wan.{json,md,png}: the WAN benchmark's runs summed up per RTT, mode and prompt kind, and issue 13's
floors checked against them.

Per kind, decode tokens/s is every turn's tokens after the first over the summed decode time (so long answers weigh
more than short ones, as they do for a user); "mixed" is the same over every kind. Tokens per round trip is decode
tokens over decode steps; bytes per token is decode traffic (both directions) over decode tokens. Time to first
token is the median over the prompts, and its excess is TTFT minus the same prompt's local prefill.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.wan.prompts import KINDS

MIXED = "mixed"
MODES = ("off", "on")


def _local_prefill(result: dict) -> dict[tuple[str, int], float]:
    rows = result.get("local", {}).get("rows", [])
    return {(r["kind"], r["prompt"]): r["prefill_s"] for r in rows}


def _prefill(turn: dict, prefill: dict[tuple[str, int], float]) -> float | None:
    """The local prefill measured next to this turn, else the one of the local pass."""
    if turn.get("local_prefill_s") is not None:
        return turn["local_prefill_s"]
    return prefill.get((turn["kind"], turn["prompt"]))


def aggregate(turns: list[dict], prefill: dict[tuple[str, int], float]) -> dict:
    tokens = sum(max(t["tokens"] - 1, 0) for t in turns)
    decode_s = sum(t["decode_s"] for t in turns)
    steps = sum(t["decode_steps"] for t in turns)
    decode_bytes = sum(t["decode_sent"] + t["decode_received"] for t in turns)
    excess = [t["ttft_s"] - _prefill(t, prefill) for t in turns if _prefill(t, prefill) is not None]
    drafted = sum(t.get("drafted", 0) for t in turns)
    return {
        "turns": len(turns),
        "tokens": sum(t["tokens"] for t in turns),
        "decode_tok_s": tokens / decode_s if decode_s > 0 else 0.0,
        "tokens_per_round_trip": tokens / steps if steps else 0.0,
        "ttft_ms": 1000 * statistics.median(t["ttft_s"] for t in turns),
        "ttft_excess_ms": 1000 * statistics.median(excess) if excess else None,
        "ttft_excess_max_ms": 1000 * max(excess) if excess else None,
        "decode_bytes_per_token": decode_bytes / tokens if tokens else 0.0,
        "draft_acceptance": sum(t.get("accepted", 0) for t in turns) / drafted if drafted else None,
        "position_share": _median_or_none([t["position_share"] for t in turns if t.get("position_share") is not None]),
    }


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(result: dict) -> dict:
    prefill = _local_prefill(result)
    runs = result["runs"]
    rtts = sorted({r["rtt_ms"] for r in runs})
    table = {}
    for rtt in rtts:
        for mode in MODES:
            chosen = [r for r in runs if r["rtt_ms"] == rtt and r["mode"] == mode]
            for kind in (*KINDS, MIXED):
                turns = [r for r in chosen if kind == MIXED or r["kind"] == kind]
                if turns:
                    table[f"{rtt:g}/{mode}/{kind}"] = aggregate(turns, prefill)
    speedup = {}
    for rtt in rtts:
        for kind in (*KINDS, MIXED):
            off, on = table.get(f"{rtt:g}/off/{kind}"), table.get(f"{rtt:g}/on/{kind}")
            if off and on and off["decode_tok_s"] > 0:
                speedup[f"{rtt:g}/{kind}"] = on["decode_tok_s"] / off["decode_tok_s"]
    return {"rtts_ms": rtts, "table": table, "speedup": speedup, "greedy_differs": greedy_differences(result),
            "floors": floors(result, rtts, table, speedup)}


def greedy_differences(result: dict) -> list[str]:
    """Prompts whose greedy tokens differ between speculation off and on (they must not), with where they part."""
    by_key: dict[tuple, dict[str, list[int]]] = {}
    for r in result["runs"]:
        by_key.setdefault((r["rtt_ms"], r["kind"], r["prompt"]), {})[r["mode"]] = r["ids"]
    for r in result.get("local", {}).get("rows", []):
        by_key[("local", r["kind"], r["prompt"])] = {m: r[m]["ids"] for m in MODES}
    out = []
    for (rtt, kind, index), modes in by_key.items():
        if len(modes) == 2 and modes["off"] != modes["on"]:
            off, on = modes["off"], modes["on"]
            first = next((i for i, (a, b) in enumerate(zip(off, on)) if a != b), min(len(off), len(on)))
            where = "local" if rtt == "local" else f"RTT {rtt:g} ms"
            out.append(f"{where} {kind} #{index} (from token {first} of {len(off)})")
    return out


def floors(result: dict, rtts: list[float], table: dict, speedup: dict) -> list[dict]:
    """Issue 13's floors: name, target, measured, holds (None: not measured)."""
    out = []

    def floor(name: str, target: str, measured: str, holds: bool | None) -> None:
        out.append({"name": name, "target": target, "measured": measured, "holds": holds})

    mixed, chat = speedup.get(f"{30:g}/{MIXED}"), speedup.get(f"{30:g}/chat")
    floor("speculation at 30 ms RTT, mixed prompt set", ">= 1.4x off",
          f"{mixed:.2f}x" if mixed else "not measured", None if mixed is None else mixed >= 1.4)
    floor("speculation at 30 ms RTT, chat prompts", ">= 1.1x off",
          f"{chat:.2f}x" if chat else "not measured", None if chat is None else chat >= 1.1)
    per_kind = {k: v for k, v in speedup.items() if not k.endswith(f"/{MIXED}")}
    if per_kind:
        worst = min(per_kind, key=per_kind.get)
        rtt, kind = worst.split("/")
        floor("speculation never slower than off by > 5%, any kind and RTT", ">= 0.95x off",
              f"worst {per_kind[worst]:.2f}x ({kind}, RTT {rtt} ms)", per_kind[worst] >= 0.95)
    ttft32 = result.get("ttft32", {})
    reference = ttft32.get("b_full_graph_s")
    label = "(b) one graph"
    if reference is None:
        reference, label = ttft32.get("c_split_local_s"), "(c) split in process (no --full export)"
    remote = ttft32.get("split_http_s")
    if reference is not None and remote is not None:
        delta = 1000 * (remote - reference)
        floor("TTFT over the direct link, 32-token prompt", f"<= {label} + 15 ms",
              f"{remote * 1000:.1f} ms vs {reference * 1000:.1f} ms (+{delta:.1f} ms)", delta <= 15)
    for rtt in rtts:
        excess = [table[f"{rtt:g}/{m}/{MIXED}"]["ttft_excess_ms"] for m in MODES if f"{rtt:g}/{m}/{MIXED}" in table]
        excess = [e for e in excess if e is not None]
        if excess:
            bound = 1.2 * rtt + 15
            floor(f"TTFT at {rtt:g} ms RTT (median over prompts, both modes)",
                  f"<= local prefill + {bound:g} ms", f"local prefill + {max(excess):.1f} ms", max(excess) <= bound)
    return out


def write(result: dict, out: Path) -> dict:
    """wan.json (raw runs + summary), wan.md and wan.png into ``out``; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    (out / "wan.json").write_text(json.dumps({**result, "summary": summary}, indent=1) + "\n")
    (out / "wan.md").write_text(markdown(result, summary))
    chart(summary, out / "wan.png")
    return summary


def markdown(result: dict, summary: dict) -> str:
    meta = result.get("meta", {})
    table = summary["table"]
    lines = [
        "# WAN benchmark (`make bench-wan`)", "",
        f"- started {meta.get('when', '?')}; bundle `{result['bundle']}`; greedy, up to {result['new_tokens']} new "
        "tokens per prompt, EOS stops a turn",
        f"- link: {meta.get('link_description', result['link'])}",
        f"- code: commit {meta.get('code', '?')}",
        f"- machine: {meta.get('machine', '')}; load average before {meta.get('load_before', '?')}, "
        f"after {meta.get('load_after', '?')}",
        f"- prompts: {len({(r['kind'], r['prompt']) for r in result['runs']})} "
        f"({', '.join(KINDS)}; bench/data/wan_prompts.json), each once per RTT and mode, off/on alternating", "",
        "## Decode tokens/s (speculation off -> on, speedup)", "",
        "| RTT | " + " | ".join((*KINDS, MIXED)) + " |",
        "|---|" + "---:|" * (len(KINDS) + 1),
    ]
    for rtt in summary["rtts_ms"]:
        cells = []
        for kind in (*KINDS, MIXED):
            off, on = table.get(f"{rtt:g}/off/{kind}"), table.get(f"{rtt:g}/on/{kind}")
            speed = summary["speedup"].get(f"{rtt:g}/{kind}")
            cells.append(f"{off['decode_tok_s']:.1f} -> {on['decode_tok_s']:.1f} ({speed:.2f}x)"
                         if off and on and speed else "-")
        lines.append(f"| {rtt:g} ms | " + " | ".join(cells) + " |")
    lines += ["", "## Per RTT, whole prompt set (off / on)", "",
              "| RTT | decode tok/s | tokens per round trip | TTFT median | TTFT - local prefill | "
              "decode bytes per token | drafts accepted | a drafted position's cost, as the client measured it |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for rtt in summary["rtts_ms"]:
        off, on = table.get(f"{rtt:g}/off/{MIXED}"), table.get(f"{rtt:g}/on/{MIXED}")
        if not (off and on):
            continue

        acceptance = f"{on['draft_acceptance']:.0%}" if on["draft_acceptance"] is not None else "-"
        cells = [_pair(off, on, key, fmt) + unit for key, fmt, unit in (
            ("decode_tok_s", ".1f", ""), ("tokens_per_round_trip", ".2f", ""), ("ttft_ms", ".0f", " ms"),
            ("ttft_excess_ms", ".0f", " ms"), ("decode_bytes_per_token", ",.0f", ""))]
        share = on.get("position_share")
        cost = f"{share:.0%} of a step" if share is not None else "-"
        lines.append(f"| {rtt:g} ms | " + " | ".join(cells) + f" | {acceptance} | {cost} |")
    local = result.get("local", {}).get("rows", [])
    if local:
        prefill = statistics.median(r["prefill_s"] for r in local) * 1000
        rates = {m: sum(r[m]["tokens"] - 1 for r in local) / sum(r[m]["decode_s"] for r in local) for m in MODES}
        lines += ["", f"Local (head + tail in one process, no network): median prefill {prefill:.0f} ms over prompts "
                  f"of {min(r['prompt_tokens'] for r in local)}-{max(r['prompt_tokens'] for r in local)} tokens; "
                  f"decode {rates['off']:.1f} tok/s off, {rates['on']:.1f} tok/s on."]
    ttft32 = result.get("ttft32")
    if ttft32:
        parts = [f"{name} {ttft32[key] * 1000:.1f} ms" for key, name in (
            ("b_full_graph_s", "(b) one graph"), ("c_split_local_s", "(c) split in process"),
            ("split_http_s", "split over the direct link")) if key in ttft32]
        lines += ["", f"32-token prompt, time to first token (median of {ttft32['repeats']}): " + "; ".join(parts)
                  + "."]
    lines += ["", "## Floors (issue 13)", "", "| floor | target | measured | holds |", "|---|---|---|---|"]
    for f in summary["floors"]:
        verdict = {True: "yes", False: "**no**", None: "not measured"}[f["holds"]]
        lines.append(f"| {f['name']} | {f['target']} | {f['measured']} | {verdict} |")
    differs = summary["greedy_differs"]
    lines += ["", "Greedy output, speculation on vs off: " + (
        "identical on every prompt." if not differs else f"differs on {len(differs)}: {', '.join(differs)}.")]
    notes = meta.get("notes", [])
    if notes:
        lines += ["", "Notes:", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def _pair(off: dict, on: dict, key: str, fmt: str) -> str:
    a, b = off[key], on[key]
    return "-" if a is None or b is None else f"{a:{fmt}} / {b:{fmt}}"


def chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rtts = summary["rtts_ms"]
    colors = dict(zip((*KINDS, MIXED), ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "black")))
    for kind, color in colors.items():
        for mode, style in (("on", "-"), ("off", "--")):
            points = [(r, summary["table"][f"{r:g}/{mode}/{kind}"]["decode_tok_s"]) for r in rtts
                      if f"{r:g}/{mode}/{kind}" in summary["table"]]
            if points:
                ax.plot(*zip(*points), style, color=color, marker="o", linewidth=2.5 if kind == MIXED else 1.2,
                        label=f"{kind}, speculation {mode}")
    ax.set_xlabel("added round-trip time (ms)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Split inference over a delayed link: speculation on (solid) vs off (dashed)")
    ax.set_xticks(rtts)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
