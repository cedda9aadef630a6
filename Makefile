# The README's two commands: `make demo` and `make test`. Each sets itself up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GX_ANALYTICS_ENABLED := false
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export MPLBACKEND := Agg

.PHONY: install system-deps demo test lint bench image clean

install: $(VENV)/.installed

# torch first: an unpinned torch (pulled by a dependency) would fetch a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U 'pip>=26'
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/grace demo

# Debian's chromium: the MLflow UI test screenshots the tracking server with it.
system-deps:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (apt)"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "warning: chromium missing (sudo apt-get install chromium); the MLflow UI test needs it"; fi; }

test: lint system-deps
	$(PY) -m pytest -q

bench: install
	$(PY) bench/bench_trie.py --write BENCHMARKS.md

# ruff (style, docstrings) and the import contract (pyproject.toml [tool.importlinter]): a
# circle or an upward import between the layers fails here.
lint: install
	$(VENV)/bin/ruff check grace components pipelines tests bench
	$(VENV)/bin/ruff format --check grace components pipelines tests bench
	$(VENV)/bin/lint-imports

# The image every KFP component runs in, tagged with the package version and the commit; push it,
# then `grace pipeline compile|submit --image $(IMAGE)`. Docker or podman, whichever is here.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= ghcr.io/grace-retrieval/grace:$(VERSION)-$(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
VARIANT ?= cpu
image:
	@engine=$$(command -v docker || command -v podman) || \
	  { echo "error: make image needs docker or podman" >&2; exit 2; }; \
	$$engine build --build-arg VARIANT=$(VARIANT) -t $(IMAGE) . && \
	echo "built $(IMAGE): push it, then grace pipeline submit --image $(IMAGE) ..."

clean:
	rm -rf $(VENV) .cache
