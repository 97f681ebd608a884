"""The attacker's own training text: uniformly random token ids and text the public model samples itself.

Nothing here reads the held-out prompts; the attacker never sees a prompt it is later scored on.
"""

from __future__ import annotations

import numpy as np

from privacy.public_model import PublicModel


def training_ids(public: PublicModel, random_sequences: int, generated_sequences: int, length: int,
                 seed: int) -> np.ndarray:
    """[random_sequences + generated_sequences, length] token ids."""
    vocab = public.embedding.shape[0]
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, vocab, (random_sequences, length), dtype=np.int64)]
    if generated_sequences:
        parts.append(public.sample_text(generated_sequences, length, seed + 1))
    return np.concatenate(parts, axis=0)
