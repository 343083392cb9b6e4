#!/usr/bin/env bash
# Create a Cloud TPU VM (one host or a multi-host slice), retrying with backoff: capacity errors are common.
#
#   launch/tpu_create.sh --name NAME --zone ZONE --accelerator-type TYPE --version RUNTIME [options]
#       [-- GCLOUD_FLAGS...]
#
#   --name NAME               the TPU VM's name
#   --zone ZONE               e.g. us-central2-b
#   --accelerator-type TYPE   e.g. v4-8, v4-64, v5litepod-16, v6e-8
#   --version RUNTIME         the TPU software version, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite, v2-alpha-tpuv6e
#   --spot | --preemptible    a Spot VM (no time limit) or a preemptible one (24 h limit); default: on-demand
#   --project PROJECT         default: gcloud's configured project
#   --attempts N              create attempts before giving up (default 5)
#   --backoff SECONDS         wait after the first failed attempt, doubled after each further one (default 60)
#   --max-backoff SECONDS     longest wait between attempts (default 600)
#   --dry-run                 print the commands, one per line, and run nothing
#   -h, --help                this help
#   -- GCLOUD_FLAGS...        more flags for `gcloud compute tpus tpu-vm create` (--network=..., --data-disk=...)
#
# After a failed attempt the VM's state is read: READY means it exists after all (success); a VM of that name left
# in another state is deleted before the next attempt.

set -euo pipefail
SCRIPT_NAME=tpu_create.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

name="" zone="" accel="" version="" tier="" project=""
attempts=5 backoff=60 max_backoff=600
DRY_RUN=${DRY_RUN:-0}
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$1" "$#"; name=$2; shift 2 ;;
    --zone) need_value "$1" "$#"; zone=$2; shift 2 ;;
    --accelerator-type) need_value "$1" "$#"; accel=$2; shift 2 ;;
    --version) need_value "$1" "$#"; version=$2; shift 2 ;;
    --spot | --preemptible)
      if [[ -n $tier && $tier != "$1" ]]; then die_usage "--spot and --preemptible exclude each other"; fi
      tier=$1; shift ;;
    --project) need_value "$1" "$#"; project=$2; shift 2 ;;
    --attempts) need_value "$1" "$#"; attempts=$2; shift 2 ;;
    --backoff) need_value "$1" "$#"; backoff=$2; shift 2 ;;
    --max-backoff) need_value "$1" "$#"; max_backoff=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) print_usage "$0"; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
done
require --name "$name"
require --zone "$zone"
require --accelerator-type "$accel"
require --version "$version"
require_uint --attempts "$attempts"
require_uint --backoff "$backoff"
require_uint --max-backoff "$max_backoff"
if [[ $attempts -lt 1 ]]; then die_usage "--attempts must be at least 1"; fi
set_project "$project"

create=(gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" --version="$version")
if [[ -n $tier ]]; then create+=("$tier"); fi
create+=(${project_flags[@]+"${project_flags[@]}"} ${extra[@]+"${extra[@]}"})

if [[ $DRY_RUN == 1 ]]; then
  note "tpu_create: up to $attempts attempts, ${backoff} s apart at first, doubling up to ${max_backoff} s"
  run "${create[@]}"
  exit 0
fi

delay=$backoff
for ((attempt = 1; attempt <= attempts; attempt++)); do
  note "attempt $attempt/$attempts: creating $name ($accel${tier:+ $tier}) in $zone"
  if run "${create[@]}"; then
    note "$name created"
    exit 0
  fi
  state=$(tpu_state "$name" "$zone")
  case $state in
    READY) note "$name exists and is READY"; exit 0 ;;
    NOT_FOUND | UNKNOWN) ;;
    *)
      note "$name was left $state; deleting it before the next attempt"
      run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" ${project_flags[@]+"${project_flags[@]}"} \
        --quiet || true ;;
  esac
  if [[ $attempt -lt $attempts ]]; then
    note "attempt $attempt failed; next one in ${delay} s"
    pause "$delay"
    delay=$((delay * 2 > max_backoff ? max_backoff : delay * 2))
  fi
done
die "could not create $name after $attempts attempts"
