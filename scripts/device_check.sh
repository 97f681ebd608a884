#!/usr/bin/env bash
# The GPU check as run on this project's lent GPU machine (Python 3.12 with torch, transformers, onnx, onnxscript
# and the CUDA 13 libraries already installed; no network): installs onnxruntime-gpu (CUDA 13 build, passed as
# an argument) and the service's small
# dependencies (fastapi needs opentelemetry-api, importlib-metadata, zipp) from carried wheels, exports random:tiny and the TinyLlama-shaped tail in fp16, runs the gpu tests
# and prints tail step latency with its share of the HBM bandwidth bound. On a box with network, use gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 LOG_LEVEL=WARNING
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@" .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
LD_LIBRARY_PATH="$(python3 -c 'import glob, os, nvidia
print(":".join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "*", "lib")))))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import onnxruntime as o, torch, transformers; print("onnxruntime", o.__version__, o.get_available_providers(), "torch", torch.__version__, "transformers", transformers.__version__)'
out=${SPLIT_GPU_BUNDLES:-bundles/gpu}
export SPLIT_GPU_BUNDLES=$out
time python3 -m export --model random:tinyllama --split-layer 4 --dtype fp16 --out "$out/random-tinyllama-k4-fp16"
timeout 300 python3 -m pytest -m gpu tests/test_gpu.py -rA -q -p no:cacheprovider -o addopts="" || echo "gpu tests: exit $?"
python3 scripts/tail_latency.py "$out/random-tinyllama-k4-fp16" "$out/random-tiny-k2-fp16" --past 128 1024 --steps 32
