#!/usr/bin/env bash
# Run one command on every worker of a TPU VM (one host or a multi-host slice), from the code directory there, with
# its venv active. Every worker runs the same program: JAX's multi-controller runtime finds its peers by itself.
# The exit status is non-zero when the command failed on any worker.
#
#   launch/tpu_run.sh --name NAME --zone ZONE [options] -- COMMAND [ARG...]
#
#   --name NAME          the TPU VM's name
#   --zone ZONE          its zone
#   --dir DIR            the code directory on each worker, relative to the home directory (default fusion_jax)
#   --venv PATH          the venv to activate, relative to DIR (default .venv)
#   --no-venv            activate none
#   --env KEY=VALUE      set KEY on the workers (repeatable), e.g. --env HF_HUB_OFFLINE=1
#   --pass-env KEY       send this machine's value of KEY (repeatable; an error when unset)
#   --project PROJECT    default: gcloud's configured project
#   --worker WORKER      all (default) or one worker's index
#   --dry-run            print the command, one line, and run nothing
#   -h, --help           this help
#   -- COMMAND [ARG...]  the command; each word is quoted for the remote shell, so it runs exactly as written here
#                        (for pipes or &&, pass a shell: -- bash -c 'a && b')

set -euo pipefail
SCRIPT_NAME=tpu_run.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

name="" zone="" project="" worker=all dir=fusion_jax venv=.venv
DRY_RUN=${DRY_RUN:-0}
envs=() cmd=()
add_env() {
  local key=${1%%=*}
  if [[ $1 != *=* || ! $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    die_usage "--env needs KEY=VALUE with KEY a variable name, got '$1'"
  fi
  envs+=("$(quote_assign "$1")")
}
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$1" "$#"; name=$2; shift 2 ;;
    --zone) need_value "$1" "$#"; zone=$2; shift 2 ;;
    --dir) need_value "$1" "$#"; dir=$2; shift 2 ;;
    --venv) need_value "$1" "$#"; venv=$2; shift 2 ;;
    --no-venv) venv=""; shift ;;
    --env) need_value "$1" "$#"; add_env "$2"; shift 2 ;;
    --pass-env)
      need_value "$1" "$#"
      need_set_env "$2"
      add_env "$2=${!2}"; shift 2 ;;
    --project) need_value "$1" "$#"; project=$2; shift 2 ;;
    --worker) need_value "$1" "$#"; worker=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) print_usage "$0"; exit 0 ;;
    --) shift; cmd=("$@"); break ;;
    *) die_usage "unknown argument '$1' (the command goes after --)" ;;
  esac
done
require --name "$name"
require --zone "$zone"
if [[ ${#cmd[@]} -eq 0 ]]; then die_usage "missing required argument COMMAND (after --)"; fi
set_project "$project"

remote="cd $(quote_word "$dir")"
if [[ ${#envs[@]} -gt 0 ]]; then remote+=" && export ${envs[*]}"; fi
if [[ -n $venv ]]; then remote+=" && . $(quote_word "$venv/bin/activate")"; fi
remote+=" && $(quote_cmd "${cmd[@]}")"

run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker="$worker" \
  ${project_flags[@]+"${project_flags[@]}"} --command="$remote"
