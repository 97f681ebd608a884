"""Boundary noise: Gaussian noise the client adds to the hidden states before they leave the machine.

The noise is scaled per position by the RMS of that position's hidden vector, so one ``sigma`` means the same
signal-to-noise ratio at every split layer and every position (the first positions of a sequence carry far larger
activations than the rest). ``sigma`` 0 returns the input array itself, so turning the lever off changes nothing,
bit for bit. What a sigma buys and costs is measured by ``python -m privacy``.
"""

from __future__ import annotations

import numpy as np


class BoundaryNoise:
    """Adds ``sigma * rms(h) * N(0, 1)`` to each position's hidden vector ``h``.

    ``seed`` None draws the generator's state from the operating system, which is what a client wants: the tail
    operator must not be able to predict the noise. Tests and the meter pass a seed to be reproducible.
    """

    def __init__(self, sigma: float, seed: int | None = None) -> None:
        if not sigma >= 0:
            raise ValueError(f"noise sigma must be >= 0 (a multiple of the activation RMS), got {sigma}")
        self.sigma = float(sigma)
        self.rng = np.random.default_rng(seed)

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        """hidden [..., hidden_size] -> the same shape and dtype, with noise; sigma 0 returns ``hidden`` itself."""
        if self.sigma == 0:
            return hidden
        values = hidden.astype(np.float32, copy=False)
        rms = np.sqrt(np.mean(np.square(values), axis=-1, keepdims=True))
        noise = self.rng.standard_normal(values.shape, dtype=np.float32)
        return (values + noise * (self.sigma * rms)).astype(hidden.dtype, copy=False)
