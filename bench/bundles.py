"""The bundles a benchmark needs, exported (or found up to date) with ``python -m export`` in a child process.

One export per model and weight scheme (``--weights``), each holding the split and the unsplit graph (``--full``).
A quantized export that falls below its quality floor fails; that is a finding about the scheme on this model, so
it is recorded and the run goes on without it. Exporting in a child keeps PyTorch's memory out of the benchmark.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from splitcore.errors import SplitError
from splitcore.manifest import load_bundle

log = logging.getLogger(__name__)


@dataclass
class ModelBundles:
    model: str
    split_layer: int
    by_weights: dict[str, Path] = field(default_factory=dict)  # scheme -> export dir holding client/ server/ full/
    missing: dict[str, str] = field(default_factory=dict)  # scheme -> why it has no bundle

    @property
    def reference(self) -> Path:
        """The fp32 export when there is one (the parity reference), else the first."""
        return self.by_weights.get("fp32") or next(iter(self.by_weights.values()))


def bundle_name(model: str) -> str:
    return model.replace("random:", "random-").rstrip("/").split("/")[-1].removesuffix(".gguf")


def prepare(model: str, split_layer: int, root: Path, schemes: list[str]) -> ModelBundles:
    found = ModelBundles(model, split_layer)
    for scheme in schemes:
        out = root / f"{bundle_name(model)}-k{split_layer}-{scheme}"
        try:
            _export(["--model", model, "--split-layer", str(split_layer), "--weights", scheme, "--full",
                     "--out", str(out)])
        except SplitError as e:
            if scheme == "fp32":
                raise
            log.warning("%s: no %s configurations (%s)", model, scheme, e)
            found.missing[scheme] = str(e)
            continue
        found.by_weights[scheme] = out
    return found


def given(model: str, split_layer: int, paths: list[Path]) -> ModelBundles:
    """Bundles exported beforehand (``--bundle``, one per weight scheme); the scheme is read from each manifest."""
    found = ModelBundles(model, split_layer)
    for path in paths:
        manifest = load_bundle(path / "client", "client", verify=False).manifest
        if not (path / "full").is_dir():
            raise SplitError(f"{path} has no full graph: export it with --full")
        scheme = manifest.head.weights
        if scheme in found.by_weights:
            raise SplitError(f"two --bundle directories with {scheme} weights: {found.by_weights[scheme]}, {path}")
        found.by_weights[scheme] = path
    return found


def _export(args: list[str]) -> None:
    """Run the exporter with its log passed through; a failure raises with the exporter's own error line."""
    log.info("export %s (skipped when up to date)", " ".join(args))
    process = subprocess.Popen([sys.executable, "-m", "export", *args], stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    last = ""
    for line in process.stderr:
        sys.stderr.write(line)
        if line.strip():
            last = line.strip()
    if process.wait() != 0:
        code = f"exit code {process.returncode}"
        reason = last.removeprefix("export: error: ") if last.startswith("export: error:") else code
        raise SplitError(f"export {' '.join(args)} failed: {reason}")
