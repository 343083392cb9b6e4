# Every target sets itself up: a fresh machine needs only python3.11 (or PYTHON=...) and PyPI.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
# 8 fake CPU devices so mesh code runs anywhere; a real TPU/GPU ignores this flag.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m fusion_jax.forward --config configs/demo.yaml

bench: $(STAMP)
	$(BIN)/python bench/forward.py
	$(BIN)/python bench/align.py
	$(BIN)/python bench/capture.py
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV)
