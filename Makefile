# Every target sets itself up: a fresh machine needs only python3.11 (or PYTHON=...) and PyPI.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
export HF_HUB_OFFLINE := 1
# 8 fake CPU devices so mesh code runs anywhere; a real TPU/GPU ignores this flag.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: setup test demo bench clean

# The package and what the main job needs (no torch: that is a test-only dependency).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $(TEST_STAMP)

setup: $(TEST_STAMP)

# The layers contract first (pyproject.toml: imports point down), then the suite.
test: $(TEST_STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

# The main job on its built-in default (configs/demo.yaml; ARGS="--set ..." to change it). One CPU device: XLA
# runs the small models faster on one host device than on 8 fake ones.
demo: $(STAMP)
	env -u XLA_FLAGS $(BIN)/python -m fusion_jax.train --config configs/demo.yaml $(ARGS)

bench: $(TEST_STAMP)
	$(BIN)/python bench/forward.py
	$(BIN)/python bench/align.py
	$(BIN)/python bench/capture.py
	$(BIN)/python bench/train_step.py
	env -u XLA_FLAGS $(BIN)/python bench/fusion_quality.py

clean:
	rm -rf $(VENV)
