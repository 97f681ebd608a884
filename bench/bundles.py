"""The bundles a benchmark needs, exported (or found up to date) with ``python -m export`` in a child process.

One export per model holds the split and the unsplit graph (``--full``); a second holds the int8 head. Exporting
in a child keeps PyTorch's memory out of the benchmark's processes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from splitcore.errors import SplitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelBundles:
    model: str
    split: Path  # holds client/, server/ and full/
    int8: Path | None  # client/ with the int8 head, server/
    int8_missing: str | None = None  # why there is no int8 bundle


def prepare(model: str, split_layer: int, root: Path, int8: bool = True) -> ModelBundles:
    name = model.replace("random:", "random-").rstrip("/").split("/")[-1].removesuffix(".gguf")
    split = root / f"{name}-k{split_layer}"
    _export(["--model", model, "--split-layer", str(split_layer), "--full", "--out", str(split)])
    if not int8:
        return ModelBundles(model, split, None)
    quantized = root / f"{name}-k{split_layer}-int8"
    try:
        _export(["--model", model, "--split-layer", str(split_layer), "--quantize-head", "int8", "--out",
                 str(quantized)])
    except SplitError as e:
        # An int8 head that fails its accuracy floor is a finding about the model, not a reason to stop the run.
        log.warning("%s: no int8 head configuration (%s)", model, e)
        return ModelBundles(model, split, None, f"int8 head export failed its validation ({e})")
    return ModelBundles(model, split, quantized)


def _export(args: list[str]) -> None:
    log.info("export %s (skipped when up to date)", " ".join(args))
    code = subprocess.call([sys.executable, "-m", "export", *args])
    if code != 0:
        raise SplitError(f"export {' '.join(args)} failed with exit code {code}")
