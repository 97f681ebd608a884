"""Write a meter run as JSON (everything), markdown (the tables) and a PNG chart into a reports directory."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from privacy.chart import draw
from privacy.meter import ATTACKS, LABELS, MeterResult

log = logging.getLogger(__name__)


def write(result: MeterResult, out: Path, total_seconds: float) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = result.as_json() | {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_seconds": total_seconds,
    }
    paths = {"json": out / "privacy.json", "markdown": out / "privacy.md", "chart": out / "privacy.png"}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["markdown"].write_text(markdown(data))
    draw(data, paths["chart"])
    for path in paths.values():
        log.info("wrote %s", path)
    return paths


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(data: dict) -> str:
    cfg = data["config"]
    ks = list(data["splits"])
    lines = [
        f"# Privacy meter: {data['model']}",
        "",
        f"{data['heldout']['prompts']} held-out prompts ({data['heldout']['tokens']} tokens, at most "
        f"{cfg['max_prompt_tokens']} each); attacker trained on {cfg['train_random']} random + "
        f"{cfg['train_generated']} self-generated sequences of {cfg['train_length']} tokens; replay tries "
        f"{cfg['candidates'] or 'all'} candidates per position. Chance: {100 * data['chance']:.2g}% per token.",
        "",
        "## Recovery by split layer K (tokens / whole prompts; attack time)",
        "",
        "| attack | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for attack in ATTACKS:
        cells = []
        for k in ks:
            r = data["splits"][k][attack]
            cells.append(f"{pct(r['token_recovery'])} / {pct(r['prompt_recovery'])}; {r['seconds']:.1f} s")
        lines.append(f"| {LABELS[attack]} | " + " | ".join(cells) + " |")
    noise = data["noise"]
    lines += [
        "",
        f"## Boundary noise at K={noise['k']} (token recovery; utility cost)",
        "",
        "| sigma (x RMS) | " + " | ".join(LABELS[a] for a in ATTACKS)
        + " | greedy agreement | perplexity (clean -> noisy) |",
        "|---|" + "---|" * (len(ATTACKS) + 2),
    ]
    for row in noise["sweep"]:
        cells = [pct(row["attacks"][a]["token_recovery"]) for a in ATTACKS]
        u = row["utility"]
        ratio = u["perplexity"] / u["perplexity_clean"]
        cells += [pct(u["greedy_agreement"]), f"{u['perplexity_clean']:.1f} -> {u['perplexity']:.1f} (x{ratio:.2f})"]
        lines.append(f"| {row['sigma']:g} | " + " | ".join(cells) + " |")
    halving = ", ".join(
        f"{LABELS[a]} {'sigma ' + format(s, 'g') if s is not None else 'none (not within the sweep, or at chance)'}"
        for a, s in noise["halving_sigma"].items()
    )
    lines += ["", f"Smallest swept sigma that halves token recovery: {halving}.", ""]
    return "\n".join(lines)
