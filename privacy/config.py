"""What one meter run measures and how big it is; two presets, every field overridable from the command line."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MeterConfig:
    model: str  # an export --model argument; the bundles at each K are exported from it
    ks: tuple[int, ...]  # split layers to attack
    prompts: int  # held-out prompts used (the first n of the data file)
    max_prompt_tokens: int  # each prompt is cut to this many tokens
    train_random: int  # attacker training sequences of uniformly random tokens
    train_generated: int  # attacker training sequences sampled from the public model
    train_length: int  # tokens per training sequence
    candidates: int  # replay search: inverter candidates tried per position; 0 tries the whole vocabulary
    fallback: int  # replay search without noise: candidates tried where none of the first reproduces the state
    sigmas: tuple[float, ...]  # boundary-noise sweep, multiples of each position's RMS
    noise_k: int  # the split layer the noise sweep runs at
    utility_tokens: int  # each utility text is cut to this many tokens
    seed: int = 0

    def __post_init__(self) -> None:
        if self.noise_k not in self.ks:
            raise ValueError(f"noise_k {self.noise_k} must be one of the attacked split layers {self.ks}")
        if 0.0 not in self.sigmas:
            raise ValueError("the noise sweep needs sigma 0 as its noise-free reference")
        if min(self.prompts, self.max_prompt_tokens, self.train_length) < 1 or self.candidates < 0:
            raise ValueError("prompts, max_prompt_tokens and train_length must be >= 1, candidates >= 0")

    def with_overrides(self, **fields) -> MeterConfig:
        return replace(self, **{k: v for k, v in fields.items() if v is not None})


# CI: random:tiny has 4 layers, so every split it has; its vocabulary is small enough for an exhaustive replay.
QUICK = MeterConfig(
    model="random:tiny", ks=(1, 2, 3), prompts=50, max_prompt_tokens=24, train_random=96, train_generated=32,
    train_length=24, candidates=0, fallback=0, sigmas=(0.0, 0.3, 1.0, 3.0, 10.0), noise_k=1, utility_tokens=32,
)
# The README's numbers: SmolLM2 at the splits users pick, ~10-15 minutes on 2 cores once the bundles exist.
FULL = MeterConfig(
    model="smollm2", ks=(1, 2, 4, 8), prompts=50, max_prompt_tokens=24, train_random=192, train_generated=64,
    train_length=32, candidates=64, fallback=512, sigmas=(0.0, 0.1, 0.25, 0.5, 1.0, 2.0), noise_k=4, utility_tokens=48,
)
