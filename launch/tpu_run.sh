#!/usr/bin/env bash
# Run one command on every worker of a TPU VM (single- or multi-host) from the repo checkout there.
#   launch/tpu_run.sh NAME ZONE 'make setup && .venv/bin/python -m fusion_jax.forward --config configs/demo.yaml'
# Each worker runs the same program; JAX's multi-controller runtime finds its peers on TPU pods by itself.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE COMMAND [REPO_DIR_ON_VM=fusion_jax]" >&2
  exit 2
fi
name=$1 zone=$2 command=$3 repo=${4:-fusion_jax}
exec gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd $(printf %q "$repo") && $command"
