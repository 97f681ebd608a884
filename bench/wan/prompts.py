"""The WAN benchmark's fixed prompt set (bench/data/wan_prompts.json): kinds of request, a few prompts each."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "data" / "wan_prompts.json"
KINDS = ("chat", "summarize", "rewrite", "code", "list")


@dataclass(frozen=True)
class Prompt:
    kind: str
    index: int
    text: str


def load_prompts(path: Path = PROMPTS_FILE, per_kind: int | None = None) -> list[Prompt]:
    """Every kind's prompts in file order (the first ``per_kind`` of each when given); unknown kinds are refused."""
    kinds = json.loads(path.read_text())["kinds"]
    unknown = sorted(set(kinds) - set(KINDS))
    missing = [k for k in KINDS if not kinds.get(k)]
    if unknown or missing:
        raise ValueError(f"{path}: kinds must be exactly {list(KINDS)}, each with prompts; unknown {unknown}, "
                         f"missing or empty {missing}")
    return [Prompt(kind, i, text) for kind in KINDS for i, text in enumerate(kinds[kind][:per_kind])]
