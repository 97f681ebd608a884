"""The fixed text sets shipped with the meter, and their token ids under a bundle's tokenizer.

``heldout_prompts.txt`` is only ever the victim's input; nothing an attacker trains on is read from it (attacker
data comes from ``attacker_data``: random ids and text the public model writes itself).
"""

from __future__ import annotations

from importlib import resources

from tokenizers import Tokenizer

from splitcore.errors import ManifestError
from splitcore.manifest import Bundle

HELDOUT_PROMPTS = "heldout_prompts.txt"
UTILITY_TEXTS = "utility_texts.txt"


def load_lines(name: str) -> list[str]:
    text = resources.files("privacy").joinpath("data", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def encode(bundle: Bundle, lines: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each line without special tokens (the user's own text only), cut to ``max_tokens``."""
    spec = bundle.manifest.tokenizer
    if spec is None:
        raise ManifestError(f"the bundle in {bundle.root} has no tokenizer; the meter needs one to encode prompts")
    tokenizer = Tokenizer.from_file(str(bundle.path(spec.file)))
    return [tokenizer.encode(line, add_special_tokens=False).ids[:max_tokens] for line in lines]
