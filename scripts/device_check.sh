#!/usr/bin/env bash
# The GPU check as run on this project's lent GPU machine (Python 3.12 with torch, transformers, onnx, onnxscript
# and the CUDA 13 libraries already installed; no network, 64 MiB carried per call). From the repo root:
#
#   scripts/device_check.sh --prepare   here, with network: fills .whl/ (git-ignored; carry it to the GPU machine)
#   scripts/device_check.sh [OUT_DIR]   there (SECTIONS="tests latency load" by default; a subset runs only those)
#
# .whl/ holds onnxruntime-gpu (CUDA 13 build) as a tarball whose CUDA provider keeps only its sm_90 cubins
# (scripts/prune_fatbin.py: the 255 MB wheel becomes 61 MB, for Hopper only) and the service's small dependencies as
# wheels (fastapi needs opentelemetry-api, importlib-metadata). It exports random:tiny (fp32, fp16) and the
# TinyLlama-shaped tail (fp16, and int4 with fp16 activations), runs the gpu tests, and prints the tail's decode
# step at batch 1/4/16, plain and as a CUDA graph, with its share of the HBM bound, then `python -m bench.load` on the
# fp16 TinyLlama-shaped tail (the service on the GPU, 1/4/16/64 concurrent sessions). Every step is bounded and logs
# to OUT_DIR/log.txt; one failing step does not stop the next. On a box with network, use gpu_check.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
ORT_GPU=${ORT_GPU:-1.31.1}

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    work=$(mktemp -d)
    target=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    python3 -m pip download -q "${target[@]}" -d "$work" "onnxruntime-gpu==$ORT_GPU"
    (cd "$work" && unzip -q onnxruntime_gpu-*.whl 'onnxruntime/*')
    capi="$work/onnxruntime/capi"
    python3 scripts/prune_fatbin.py "$capi/libonnxruntime_providers_cuda.so" "$capi/pruned.so"
    mv "$capi/pruned.so" "$capi/libonnxruntime_providers_cuda.so"
    # The Python module links onnxruntime statically; the C library and the TensorRT provider are not used here.
    rm -f "$capi"/libonnxruntime.so.* "$capi/libonnxruntime_providers_tensorrt.so"
    rm -rf "$work/onnxruntime/transformers"  # the image's CPU onnxruntime has it (see below)
    mkdir -p .whl
    rm -f .whl/*
    tar -C "$work" -cf - onnxruntime | xz -9e -T0 > ".whl/onnxruntime_gpu-$ORT_GPU-sm90.tar.xz"
    python3 -m pip download -q "${target[@]}" -d .whl fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 \
        pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 \
        typing-inspection==0.4.5 uvicorn==0.54.0 opentelemetry-api importlib-metadata typing-extensions
    rm -rf "$work"
    du -sh .whl
    exit 0
fi

out=${1:-${OUT:-/tmp/device-check}}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1 LOG_LEVEL=WARNING
started=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - started )) s)"; }

step "installing onnxruntime-gpu and the service's dependencies into /tmp/site"
mkdir -p /tmp/site
tar -xJf .whl/onnxruntime_gpu-*.tar.xz -C /tmp/site
# onnxruntime.quantization imports onnxruntime.transformers, left out of the tarball: the image's CPU onnxruntime has it.
image_ort=$(python3 -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))')
[[ -d /tmp/site/onnxruntime/transformers ]] || cp -r "$image_ort/transformers" /tmp/site/onnxruntime/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
LD_LIBRARY_PATH="$(python3 -c 'import glob, os, nvidia
print(":".join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "*", "lib")))))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import onnxruntime as o, torch, transformers; print("onnxruntime", o.__version__, o.get_available_providers(), "torch", torch.__version__, "transformers", transformers.__version__)'

bundles=${SPLIT_GPU_BUNDLES:-/tmp/gpu-bundles}
export SPLIT_GPU_BUNDLES=$bundles
export_bundle() {  # name, export args...
    local name=$1; shift
    timeout 400 python3 -m export "$@" --out "$bundles/$name" > "$out/export-$name.log" 2>&1 \
        && echo "exported $name" || { echo "export of $name failed: exit $?"; tail -20 "$out/export-$name.log"; }
}

sections=" ${SECTIONS:-tests latency load} "
wants() { [[ "$sections" == *" $1 "* ]]; }

step "exporting the TinyLlama-shaped fp16 tail in the background"
export_bundle random-tinyllama-k4-fp16 --model random:tinyllama --split-layer 4 --weights fp16 &
tinyllama=$!

if wants tests; then
    step "exporting random:tiny; gpu tests"
    export_bundle random-tiny-k2-fp32 --model random:tiny --split-layer 2 --weights fp32
    export_bundle random-tiny-k2-fp16 --model random:tiny --split-layer 2 --weights fp16
    timeout 240 python3 -m pytest -m gpu tests/test_gpu.py tests/test_batching.py -rA -q -s -p no:cacheprovider \
        -o addopts="" 2>&1 | tee "$out/pytest.txt" | grep -vE "^(tests/|  )" | tail -60 || true
fi

step "waiting for the TinyLlama fp16 export"
wait $tinyllama
if wants latency; then
    step "TinyLlama int4 (fp16 activations) export in the background; fp16 tail step latency"
    export_bundle random-tinyllama-k4-int4 --model random:tinyllama --split-layer 4 --weights int4 --dtype fp16 &
    int4=$!
    timeout 180 python3 scripts/tail_latency.py "$bundles/random-tinyllama-k4-fp16" "$bundles/random-tiny-k2-fp16" \
        --past 128 1024 --batch 1 4 16 --steps 32 || echo "tail latency: exit $?"
    wait $int4
    step "int4 tail step latency"
    timeout 120 python3 scripts/tail_latency.py "$bundles/random-tinyllama-k4-int4" --past 128 1024 --batch 1 4 16 \
        --steps 32 || echo "tail latency: exit $?"
fi
if wants load; then
    step "the service on the GPU under load (TinyLlama-shaped fp16 tail)"
    timeout 240 python3 -m bench.load --bundle "$bundles/random-tinyllama-k4-fp16" --levels 1,4,16,64 --steps 64 \
        --out "$out/load" || echo "bench.load: exit $?"
fi
step "done"
