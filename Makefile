# make run: install and start the service.  make test: install dev tools, lint, type-check, install nginx for the
# load balancer tests, chromium for the browser tests and the agent CLIs for their tests (test-deps), run every test.
# make bench: install bench tools, run the performance benchmark (bench/perf; BENCH_ARGS=... passes options).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
export HOST PORT

.PHONY: run test lint docs test-deps agent-clis chromium install install-dev bench clean

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

# The load balancer tests (tests/integration/test_load_balancer.py) run deploy/nginx.conf in Debian's nginx: installed
# here when missing, with apt as root. Quiet when it is there; never fails the build: where nginx cannot be installed
# those tests skip, saying why (and fail when CI=true).
test-deps: agent-clis chromium
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "Installing nginx (Debian package) for the load balancer tests"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -qq --no-install-recommends nginx >/dev/null 2>&1 || \
			{ apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends nginx >/dev/null 2>&1; } || \
			echo "nginx could not be installed: the load balancer tests will skip"; \
		else \
			echo "nginx is not installed and cannot be installed here (needs root and apt-get): the load balancer tests will skip"; \
		fi; \
	}

# The browser tests (tests/integration/test_ui.py) drive Debian's chromium with Playwright (requirements-dev.txt; its
# own browser download is never used): installed here when missing, as nginx is; quiet when it is there; never fails
# the build: where it cannot be installed those tests skip, saying why (and fail when CI=true).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "Installing chromium (Debian package) for the browser tests"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
			{ apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } || \
			echo "chromium could not be installed: the browser tests will skip"; \
		else \
			echo "chromium is not installed and cannot be installed here (needs root and apt-get): the browser tests will skip"; \
		fi; \
	}

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
