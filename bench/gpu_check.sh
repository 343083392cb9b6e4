#!/usr/bin/env bash
# The GPU check, in one go on a bare single-GPU machine (NVIDIA H100/H200) that has this repo copied but no venv:
# make a venv, install the project with its CUDA extra, then run bench/gpu_check.py — a ~1B Llama-style target with
# two teachers of other tokenizers and families (MPT-, GPT-NeoX-style), online (teachers inside the step) vs cached
# (captured first): step time, tokens/s, MFU, peak device memory. One JSON line per mode, then a summary line with
# cached_over_online_tokens_per_s. Sizes and the time estimate: bench/gpu_check.py's docstring (full run ≈ 5.5–7 min
# after the install, an estimate; the whole script is meant to finish in under 8 min).
#
#   bash bench/gpu_check.sh                    # full size (flags after the script go to gpu_check.py)
#   bash bench/gpu_check.sh --batch 24         # e.g. a larger batch; --help lists every flag
#   bash bench/gpu_check.sh --dry-run          # say what it would do (venv, install, plan with param counts); no change
#   GPU_CHECK_PYTHON=.venv/bin/python bash bench/gpu_check.sh --tiny   # an existing interpreter, no venv (tests, CPU)
#
# Environment:
#   GPU_CHECK_PYTHON   use this interpreter as it is: no venv is made, nothing is installed
#   GPU_CHECK_VENV     the venv to make or reuse (default /tmp/fusion_jax_gpu_check_venv, outside the repo)
#   GPU_CHECK_BASE_PYTHON  the python that makes the venv (default python3; the project needs 3.11 or 3.12)
#   GPU_CHECK_WHEELS   a folder of wheels: pip installs from it alone (--no-index --find-links), for offline machines;
#                      in the fallback below its wheels are installed as they are (--no-deps) next to the machine's
#                      own packages — e.g. only what an image with JAX lacks (grain, array-record, rapidfuzz,
#                      tensorboardX)
#   GPU_CHECK_EXTRA    the pyproject extra to install (default cuda = jax[cuda12]); empty: none
#   GPU_CHECK_PIP_TIMEOUT  seconds the install may take (default 300)
#   GPU_CHECK_TIMEOUT  seconds the check itself may take (default 540; gpu_check.py also stops each phase at 420 s)
#   GPU_CHECK_ALLOW_CPU=1  run even when JAX sees no GPU (the full size on a CPU would take hours)
#
# When the venv cannot be made or `pip install -e '.[cuda]'` fails (no PyPI: the usual case on a machine that
# reaches nothing), the script says so and falls back to the base python3 itself with PYTHONPATH=<repo> (plus
# GPU_CHECK_WHEELS's wheels, if any): an image that already has JAX with CUDA can still run the check, with its own
# package versions rather than pyproject's pins (both are printed). Whatever is still missing is named, exit 3.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

DRY=0
ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
TINY=0
for a in "${ARGS[@]+"${ARGS[@]}"}"; do [ "$a" = "--tiny" ] && TINY=1; done

VENV="${GPU_CHECK_VENV:-/tmp/fusion_jax_gpu_check_venv}"
BASE="${GPU_CHECK_BASE_PYTHON:-python3}"
EXTRA="${GPU_CHECK_EXTRA-cuda}"
SPEC="."
[ -n "$EXTRA" ] && SPEC=".[$EXTRA]"
PIP_OPTS=(-q --disable-pip-version-check --retries 2 --timeout 15)  # fail fast where PyPI is unreachable
[ -n "${GPU_CHECK_WHEELS:-}" ] && PIP_OPTS+=(--no-index --find-links "$GPU_CHECK_WHEELS")
PIP_TIMEOUT="${GPU_CHECK_PIP_TIMEOUT:-300}"
RUN_TIMEOUT="${GPU_CHECK_TIMEOUT:-540}"
SITE="${VENV}_site"  # the fallback's wheels
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
say() { echo "[gpu_check.sh +$(( $(date +%s) - T0 ))s] $*"; }

# Modules the check imports (module:distribution), for a clear message when something is missing.
NEEDED="jax:jax jaxlib:jaxlib flax:flax optax:optax orbax.checkpoint:orbax-checkpoint grain:grain \
array_record:array-record transformers:transformers tokenizers:tokenizers safetensors:safetensors numpy:numpy \
numba:numba rapidfuzz:rapidfuzz yaml:pyyaml tqdm:tqdm tensorboardX:tensorboardX fusion_jax.train:fusion_jax"

if [ "$DRY" = 1 ]; then
  echo "gpu_check.sh --dry-run: nothing is created, installed or run. It would:"
  command -v nvidia-smi >/dev/null && echo "  0. nvidia-smi -L   # $(nvidia-smi -L 2>/dev/null | head -1)" \
    || echo "  0. nvidia-smi -L   # (no nvidia-smi on this machine)"
  if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    PY="$GPU_CHECK_PYTHON"
    echo "  1. use GPU_CHECK_PYTHON=$PY as it is (no venv, no install)"
  else
    PY="$VENV/bin/python"
    echo "  1. $BASE -m venv $VENV   # unless it exists (the project needs Python 3.11/3.12)"
    echo "  2. $VENV/bin/pip install ${PIP_OPTS[*]} -e '$SPEC'   # at most ${PIP_TIMEOUT}s"
    echo "     on failure (no PyPI): say so, then use $BASE itself with PYTHONPATH=$PWD, the machine's own packages"
    [ -n "${GPU_CHECK_WHEELS:-}" ] && \
      echo "     and $BASE -m pip install --no-index --no-deps --target $SITE $GPU_CHECK_WHEELS/*.whl"
  fi
  MODS=""
  for pair in $NEEDED; do MODS="$MODS ${pair%%:*}"; done
  echo "  3. check the imports ($MODS ) and that JAX sees a GPU"
  echo "  4. timeout ${RUN_TIMEOUT} $PY bench/gpu_check.py ${ARGS[*]+"${ARGS[*]}"}"
  echo "     phases (each its own process): setup, capture (cached mode), online, cached; one JSON line per mode,"
  echo "     then a summary line with cached_over_online_tokens_per_s"
  echo "The plan (bench/gpu_check.py --plan):"
  PLANPY="${GPU_CHECK_PYTHON:-$BASE}"
  exec "$PLANPY" bench/gpu_check.py --plan "${ARGS[@]+"${ARGS[@]}"}"
fi

if command -v nvidia-smi >/dev/null; then
  nvidia-smi -L || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  say "no nvidia-smi on this machine"
fi

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY="$GPU_CHECK_PYTHON"
  say "using GPU_CHECK_PYTHON=$PY as it is (no venv, no install; PYTHONPATH=$PWD)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  if ! command -v "$BASE" >/dev/null; then
    say "ERROR: $BASE not found (set GPU_CHECK_BASE_PYTHON to a Python 3.11/3.12)"; exit 2
  fi
  say "base python: $(command -v "$BASE") ($("$BASE" --version 2>&1))"
  PY="$VENV/bin/python"
  ok=1
  if [ -x "$PY" ]; then
    say "reusing the venv $VENV"
  else
    say "making the venv: $BASE -m venv $VENV"
    "$BASE" -m venv "$VENV" || { say "WARNING: $BASE -m venv FAILED (Debian: apt-get install python3-venv)"; ok=0; }
  fi
  if [ $ok = 1 ]; then
    say "installing: pip install ${PIP_OPTS[*]} -e '$SPEC' (at most ${PIP_TIMEOUT}s)"
    timeout "$PIP_TIMEOUT" "$VENV/bin/pip" install "${PIP_OPTS[@]}" -e "$SPEC"
    rc=$?
    if [ $rc -eq 0 ]; then
      say "installed"
    else
      say "WARNING: pip install -e '$SPEC' FAILED (exit $rc$([ $rc -eq 124 ] && echo ': timed out')): PyPI" \
          "unreachable, a pinned version missing from GPU_CHECK_WHEELS, or an unsupported Python (the project" \
          "needs 3.11/3.12)."
      ok=0
    fi
  fi
  if [ $ok = 0 ]; then
    PY="$(command -v "$BASE")"
    say "FALLBACK: running on $PY's own packages with PYTHONPATH=$PWD; their versions may differ from" \
        "pyproject's pins (printed below)."
    if [ -n "${GPU_CHECK_WHEELS:-}" ] && ! ls "$GPU_CHECK_WHEELS"/*.whl >/dev/null 2>&1; then
      say "WARNING: GPU_CHECK_WHEELS=$GPU_CHECK_WHEELS holds no .whl files"
    elif [ -n "${GPU_CHECK_WHEELS:-}" ]; then
      say "installing the wheels of $GPU_CHECK_WHEELS as they are into $SITE"
      "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
        --target "$SITE" "$GPU_CHECK_WHEELS"/*.whl || say "WARNING: installing the wheels failed"
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" - <<'EOF'
import importlib.metadata as md
want = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "array-record", "transformers", "tokenizers",
        "numpy", "numba", "rapidfuzz", "tensorboardX", "jax-cuda12-plugin", "jax-cuda13-plugin"]
have = []
for name in want:
    try:
        have.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        have.append(f"{name} -")
print("  versions here: " + ", ".join(have))
EOF
  fi
fi

# Every module the check needs, and the JAX backend (its platform into a file: one JAX start, not two).
PLATFORM_FILE=$(mktemp)
"$PY" - "$NEEDED" "$PLATFORM_FILE" <<'EOF'
import importlib, sys
missing = []
for pair in sys.argv[1].split():
    mod, dist = pair.split(":")
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 — report every failure, not only ImportError
        missing.append(f"{dist} ({mod}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
if missing:
    print("gpu_check.sh: ERROR: cannot import what the check needs:\n  " + "\n  ".join(missing) + "\n"
          "Install them (pip install -e '.[cuda]' needs PyPI), or bring wheels and set GPU_CHECK_WHEELS=DIR.",
          file=sys.stderr)
    sys.exit(3)
import jax
d = jax.devices()
print(f"jax {jax.__version__}: {len(d)} {d[0].platform} device(s), {d[0].device_kind}")
open(sys.argv[2], "w").write(d[0].platform)
EOF
rc=$?
PLATFORM=$(cat "$PLATFORM_FILE" 2>/dev/null)
rm -f "$PLATFORM_FILE"
[ $rc -ne 0 ] && exit $rc
if [ "$PLATFORM" != "gpu" ] && [ "$PLATFORM" != "cuda" ] && [ "$TINY" = 0 ] \
    && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  say "ERROR: JAX sees no GPU (platform '$PLATFORM'): the CUDA plugin is missing or cannot load; the full size" \
      "would take hours on $PLATFORM. Run with --tiny, or set GPU_CHECK_ALLOW_CPU=1 to run anyway."
  exit 4
fi

say "running: $PY bench/gpu_check.py ${ARGS[*]+"${ARGS[*]}"} (at most ${RUN_TIMEOUT}s)"
timeout "$RUN_TIMEOUT" "$PY" bench/gpu_check.py "${ARGS[@]+"${ARGS[@]}"}"
rc=$?
[ $rc -eq 124 ] && say "ERROR: the check ran past GPU_CHECK_TIMEOUT=${RUN_TIMEOUT}s"
say "done (exit $rc)"
exit $rc
