"""`make images`: build the tail, client and export images with BuildKit, then print each one's size and build time.

Settings come from the environment (the Makefile passes its variables); an empty one leaves the Dockerfile's default:
  IMAGE_PREFIX, IMAGE_TAG   names: {IMAGE_PREFIX}split-tail:{IMAGE_TAG} (default prefix none, tag 0.1.0)
  IMAGE_BASE                one base for every image (e.g. the one `make base-image` builds); or, each on its own,
  PYTHON_IMAGE, CUDA_IMAGE  the bases of the client/export images and of the tail image
  PIP_INDEX_URL, TORCH_INDEX_URL   package indexes (build ARGs)
  ORT_GPU_VERSION, TORCH_VERSION   the tail's onnxruntime-gpu (with a CUDA base to match) and the export's torch
  PIP_CA                    CA bundle pip trusts inside the builds (default: the one this machine's pip uses; "none"
                            for none), passed as the build secret "pip-ca", never written to a layer
  BUILD_NETWORK             network of the build steps (default host: works with a daemon that has no bridge)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import Engine, NoEngine  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Image:
    name: str
    dockerfile: str
    target: str | None = None


IMAGES = [Image("tail", "Dockerfile.server", "runtime"), Image("client", "Dockerfile.client"),
          Image("export", "Dockerfile.server", "export")]


def tag(image: Image) -> str:
    return f"{os.environ.get('IMAGE_PREFIX', '')}split-{image.name}:{os.environ.get('IMAGE_TAG') or '0.1.0'}"


def pip_ca() -> str | None:
    """The CA bundle this machine's pip trusts: PIP_CA, else PIP_CERT, else pip's configured `cert`, else none."""
    chosen = os.environ.get("PIP_CA") or os.environ.get("PIP_CERT")
    if chosen is None:
        config = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"],
                                capture_output=True, text=True)
        chosen = config.stdout.strip() if config.returncode == 0 else None
    if not chosen or chosen == "none":
        return None
    if not Path(chosen).is_file():
        raise SystemExit(f"build: error: the pip CA bundle {chosen} does not exist; set PIP_CA=none or a file")
    return chosen


def build_args() -> list[str]:
    base = os.environ.get("IMAGE_BASE", "")
    values = {"PYTHON_IMAGE": os.environ.get("PYTHON_IMAGE") or base,
              "CUDA_IMAGE": os.environ.get("CUDA_IMAGE") or base,
              **{name: os.environ.get(name, "")
                 for name in ("PIP_INDEX_URL", "TORCH_INDEX_URL", "ORT_GPU_VERSION", "TORCH_VERSION")}}
    return [arg for name, value in values.items() if value for arg in ("--build-arg", f"{name}={value}")]


def build(docker: str, image: Image, common: list[str]) -> float:
    target = ["--target", image.target] if image.target else []
    command = [docker, "build", "-f", image.dockerfile, *target, "-t", tag(image), *common, "."]
    print(f"build: {tag(image)}: {' '.join(command[1:])}", file=sys.stderr)
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    if result.returncode != 0:
        raise SystemExit(f"build: error: {tag(image)} failed (exit {result.returncode}); its log is above")
    return time.monotonic() - started


def size_mb(docker: str, name: str) -> float:
    out = subprocess.run([docker, "image", "inspect", "--format", "{{.Size}}", name], capture_output=True, text=True)
    return int(out.stdout.strip()) / 1e6


def build_all(docker: str) -> None:
    common = ["--network", os.environ.get("BUILD_NETWORK") or "host", *build_args()]
    ca = pip_ca()
    if ca:
        common += ["--secret", f"id=pip-ca,src={ca}"]
    seconds = {image.name: build(docker, image, common) for image in IMAGES}
    for image in IMAGES:
        print(f"build: {tag(image):<28} {size_mb(docker, tag(image)):>6.0f} MB  built in {seconds[image.name]:.0f} s",
              file=sys.stderr)


def main() -> int:
    try:
        with Engine() as docker:
            build_all(docker)
    except NoEngine as e:
        print(f"build: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
