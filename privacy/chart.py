"""The meter's PNG: recovery by split layer, and recovery against utility across the noise sweep."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402

from privacy.meter import LABELS  # noqa: E402


def draw(data: dict, path: Path) -> None:
    fig, (by_k, by_sigma) = plt.subplots(1, 2, figsize=(11, 4.2))
    ks = [int(k) for k in data["splits"]]
    for attack, label in LABELS.items():
        by_k.plot(ks, [100 * data["splits"][str(k)][attack]["token_recovery"] for k in ks], marker="o", label=label)
    by_k.set(xlabel="split layer K", ylabel="tokens recovered (%)", title=f"{data['model']}: recovery by split",
             xticks=ks, ylim=(-2, 102))
    by_k.legend(fontsize=8)

    sweep = data["noise"]["sweep"]
    sigmas = [row["sigma"] for row in sweep]
    for attack, label in LABELS.items():
        by_sigma.plot(sigmas, [100 * row["attacks"][attack]["token_recovery"] for row in sweep], marker="o",
                      label=label)
    by_sigma.plot(sigmas, [100 * row["utility"]["greedy_agreement"] for row in sweep], "k--", marker="s",
                  label="greedy agreement (utility)")
    by_sigma.set(xlabel="noise sigma (x per-position RMS)", ylabel="%",
                 title=f"boundary noise at K={data['noise']['k']}", ylim=(-2, 102))
    by_sigma.set_xscale("symlog", linthresh=0.1)
    by_sigma.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
