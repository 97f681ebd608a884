"""One meter run: every attack at every split layer, then the noise sweep at one split, with costs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from privacy import texts
from privacy.attacker_data import training_ids
from privacy.attacks.inverter import Inverter
from privacy.attacks.lens import logit_lens, nearest_embedding
from privacy.attacks.replay import first_position_table, replay
from privacy.boundary import batched_states, sent_states
from privacy.config import MeterConfig
from privacy.public_model import PublicModel
from privacy.utility import TextLogits, utility
from splitcore.graphs import HeadRunner, LmHeadRunner, TailRunner
from splitcore.manifest import Bundle
from splitcore.noise import BoundaryNoise

log = logging.getLogger(__name__)

ATTACKS = ("logit_lens", "nearest_embedding", "inverter", "replay")
LABELS = {
    "logit_lens": "logit lens",
    "nearest_embedding": "nearest embedding",
    "inverter": "learned inverter",
    "replay": "replay search",
}
PROVIDERS = ["CPUExecutionProvider"]


@dataclass
class Recovery:
    token_recovery: float  # share of prompt positions whose token the attack names exactly
    prompt_recovery: float  # share of prompts recovered in full
    seconds: float  # wall time of the attack, training included
    ms_per_token: float
    exact_matches: float | None = None  # replay only: share of positions reproduced to float precision


def score(recovered: list[list[int]], truth: list[list[int]], seconds: float) -> Recovery:
    hits = [np.asarray(r) == np.asarray(t) for r, t in zip(recovered, truth)]
    positions = sum(len(t) for t in truth)
    return Recovery(
        token_recovery=float(sum(h.sum() for h in hits) / positions),
        prompt_recovery=float(np.mean([h.all() for h in hits])),
        seconds=seconds,
        ms_per_token=1000 * seconds / positions,
    )


def split_like(flat: np.ndarray, truth: list[list[int]]) -> list[list[int]]:
    bounds = np.cumsum([len(t) for t in truth])[:-1]
    return [part.tolist() for part in np.split(flat, bounds)]


@dataclass
class Prepared:
    """The attacker's work per split layer, done once: its training states and the position-0 table."""

    train_states: np.ndarray
    train_seconds: float
    first: np.ndarray
    first_seconds: float

    @classmethod
    def at(cls, head: HeadRunner, train_ids: np.ndarray, vocab: int) -> Prepared:
        started = time.perf_counter()
        train_states = batched_states(head, train_ids)
        train_seconds = time.perf_counter() - started
        first = first_position_table(head, vocab)
        first_seconds = time.perf_counter() - started - train_seconds
        log.info("  attacker ran its %d training sequences (%.1f s) and all %d tokens at position 0 (%.1f s) "
                 "through the public head", len(train_ids), train_seconds, vocab, first_seconds)
        return cls(train_states, train_seconds, first, first_seconds)


@dataclass
class Attacker:
    """Everything the tail operator has: public weights, its own training text, and its runs of the public head."""

    public: PublicModel
    train_ids: np.ndarray
    candidates: int
    fallback: int
    seed: int

    def attack(self, head: HeadRunner, prepared: Prepared, prompts: list[list[int]],
               sigma: float) -> dict[str, Recovery]:
        """All attacks on what the client sends with boundary noise ``sigma``.

        The attacker knows the client code and sigma, so its inverter trains on equally noised states.
        """
        train_states, train_seconds = prepared.train_states, prepared.train_seconds
        noise = BoundaryNoise(sigma, self.seed) if sigma else None
        sent = sent_states(head, prompts, noise)
        flat = np.concatenate(sent, axis=0)
        results: dict[str, Recovery] = {}

        def timed(name: str, run: Callable[[], list[list[int]]], extra_seconds: float = 0.0) -> None:
            started = time.perf_counter()
            recovered = run()
            results[name] = score(recovered, prompts, time.perf_counter() - started + extra_seconds)

        timed("logit_lens", lambda: split_like(logit_lens(self.public, flat), prompts))
        timed("nearest_embedding", lambda: split_like(nearest_embedding(self.public.embedding, flat), prompts))
        started = time.perf_counter()
        states = BoundaryNoise(sigma, self.seed + 1)(train_states) if sigma else train_states
        inverter = Inverter(self.public.embedding).fit(states, self.train_ids.reshape(-1))
        fit_seconds = train_seconds + time.perf_counter() - started
        timed("inverter", lambda: split_like(inverter.top(flat, 1)[:, 0], prompts), fit_seconds)
        started = time.perf_counter()
        fallback = 0 if sigma else self.fallback
        replays = [replay(head, inverter, observed, self.candidates, fallback, prepared.first) for observed in sent]
        seconds = time.perf_counter() - started + fit_seconds + prepared.first_seconds
        results["replay"] = score([r.tokens for r in replays], prompts, seconds)
        results["replay"].exact_matches = float(np.mean([e for r in replays for e in r.exact]))
        return results


@dataclass
class MeterResult:
    config: MeterConfig
    model_id: str
    vocab_size: int
    prompts: int
    prompt_tokens: int
    splits: dict[int, dict[str, Recovery]] = field(default_factory=dict)
    noise: dict[float, dict] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "model": self.model_id,
            "config": asdict(self.config),
            "chance": 1 / self.vocab_size,
            "heldout": {"prompts": self.prompts, "tokens": self.prompt_tokens},
            "splits": {str(k): {a: asdict(r) for a, r in v.items()} for k, v in self.splits.items()},
            "noise": {
                "k": self.config.noise_k,
                "sweep": [
                    {"sigma": s, "attacks": {a: asdict(r) for a, r in v["attacks"].items()},
                     "utility": v["utility"]}
                    for s, v in self.noise.items()
                ],
                "halving_sigma": self.halving_sigma(),
            },
        }

    def halving_sigma(self) -> dict[str, float | None]:
        """Per attack, the smallest swept sigma at which token recovery is at most half the noise-free one.

        None where no swept sigma does, or where the attack is at chance (under twice it) even without noise.
        """
        out: dict[str, float | None] = {}
        for attack in ATTACKS:
            base = self.noise[0.0]["attacks"][attack].token_recovery
            if base <= 2 / self.vocab_size:
                out[attack] = None
                continue
            hits = [s for s, v in self.noise.items() if v["attacks"][attack].token_recovery <= base / 2]
            out[attack] = min(hits) if hits else None
        return out


def run(config: MeterConfig, pairs: dict[int, tuple[Bundle, Bundle]]) -> MeterResult:
    first_client = pairs[config.ks[0]][0]
    manifest = first_client.manifest
    prompts = texts.encode(first_client, texts.load_lines(texts.HELDOUT_PROMPTS)[: config.prompts],
                           config.max_prompt_tokens)
    utility_texts = texts.encode(first_client, texts.load_lines(texts.UTILITY_TEXTS), config.utility_tokens)
    public = PublicModel.for_manifest(manifest)
    log.info("attacker writes its training text: %d random + %d sampled sequences of %d tokens",
             config.train_random, config.train_generated, config.train_length)
    started = time.perf_counter()
    train_ids = training_ids(public, config.train_random, config.train_generated, config.train_length, config.seed)
    log.info("  (%.1f s)", time.perf_counter() - started)
    attacker = Attacker(public, train_ids, config.candidates, config.fallback, config.seed)
    result = MeterResult(config, manifest.model.id, manifest.model.vocab_size, len(prompts),
                         sum(len(p) for p in prompts))
    for k in config.ks:
        client, server = pairs[k]
        head = HeadRunner(client, PROVIDERS)
        log.info("K=%d:", k)
        prepared = Prepared.at(head, train_ids, manifest.model.vocab_size)
        result.splits[k] = attacker.attack(head, prepared, prompts, 0.0)
        log_row(f"K={k}", result.splits[k])
        if k != config.noise_k:
            continue
        lm_head = LmHeadRunner(client, PROVIDERS) if client.manifest.output_mode == "hidden" else None
        logits_of = TextLogits(head, TailRunner(server, PROVIDERS), lm_head)
        for sigma in config.sigmas:
            attacks = result.splits[k] if sigma == 0 else attacker.attack(head, prepared, prompts, sigma)
            cost = utility(logits_of, utility_texts, BoundaryNoise(sigma, config.seed + 2) if sigma else None)
            result.noise[sigma] = {"attacks": attacks, "utility": {**asdict(cost),
                                                                   "perplexity_change": cost.perplexity_change}}
            log_row(f"K={k} sigma={sigma:g}", attacks,
                    f"; greedy agreement {cost.greedy_agreement:.0%}, perplexity {cost.perplexity_change:+.1%}")
    return result


def log_row(label: str, attacks: dict[str, Recovery], extra: str = "") -> None:
    parts = ", ".join(f"{name} {r.token_recovery:.0%} ({r.seconds:.1f} s)" for name, r in attacks.items())
    log.info("%s: %s%s", label, parts, extra)
