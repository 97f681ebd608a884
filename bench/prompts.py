"""Fixed prompts of exact token lengths, from the bundle's own tokenizer, so every configuration sees the same ids."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from splitcore.manifest import Bundle

TEXT = (
    "Split inference keeps the text on the user's machine: the embedding and the first decoder layers run locally, "
    "and only hidden states travel to the server, which runs the remaining layers and the language model head. "
    "This benchmark measures what that privacy costs in speed against running the whole model in one place. "
)


def prompt_ids(client: Bundle, length: int, variant: int = 0) -> list[int]:
    """``length`` token ids of a fixed English text (repeated as needed); ``variant`` rotates the start."""
    spec = client.manifest.tokenizer
    vocab = client.manifest.model.vocab_size
    if spec is None:
        rng = np.random.default_rng(variant)
        return rng.integers(0, vocab, length).tolist()
    tokenizer = Tokenizer.from_file(str(client.path(spec.file)))
    ids = [i for i in tokenizer.encode(TEXT, add_special_tokens=False).ids if i < vocab]
    ids = ids[variant % len(ids):] + ids[: variant % len(ids)]
    reps = -(-length // len(ids))
    return (ids * reps)[:length]
