"""The attacker's copy of the public weights: the same checkpoint the bundle was exported from, in PyTorch.

The attacker needs the output side (final norm, LM head, embedding matrix) for the logit lens and the inverter's
vocabulary, and the whole model to write its own training text. Which checkpoint that is comes from the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from export.sources import load_model
from splitcore.errors import ManifestError
from splitcore.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class PublicModel:
    model: torch.nn.Module
    embedding: np.ndarray  # [vocab, hidden] float32

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> PublicModel:
        args = manifest.export.get("args", {})
        if "model" not in args:
            raise ManifestError("the manifest does not record which --model it was exported from; re-run the export")
        log.info("loading the public weights of %s", args["model"])
        model = load_model(args["model"], args.get("revision"), args.get("seed", 0)).model
        config = model.config
        expected = (manifest.model.vocab_size, manifest.model.hidden_size, manifest.model.num_layers)
        got = (config.vocab_size, config.hidden_size, config.num_hidden_layers)
        if got != expected:
            raise ManifestError(f"public model has (vocab, hidden, layers) {got}, the bundle says {expected}")
        embedding = model.model.embed_tokens.weight.detach().float().numpy()
        return cls(model, embedding)

    def lens_logits(self, hidden: np.ndarray) -> np.ndarray:
        """The public final norm + LM head applied to hidden states [n, hidden] -> [n, vocab]."""
        with torch.no_grad():
            h = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
            return self.model.lm_head(self.model.model.norm(h)).numpy()

    def sample_text(self, sequences: int, length: int, seed: int) -> np.ndarray:
        """Token ids [sequences, length] the model writes itself (temperature 1) from a random first token."""
        generator = torch.Generator().manual_seed(seed)
        vocab = self.embedding.shape[0]
        ids = torch.randint(0, vocab, (sequences, 1), generator=generator)
        with torch.no_grad():
            past = None
            step = ids
            for _ in range(length - 1):
                out = self.model(input_ids=step, past_key_values=past, use_cache=True)
                past = out.past_key_values
                probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
                step = torch.multinomial(probs, 1, generator=generator)
                ids = torch.cat([ids, step], dim=1)
        return ids.numpy().astype(np.int64)
