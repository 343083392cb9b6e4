#!/usr/bin/env bash
# Keep a command running on a TPU VM through preemptions: run it on all workers; when it fails, read the VM's state,
# and if the VM was PREEMPTED, TERMINATED, STOPPED or is gone, delete it, recreate it (tpu_create.sh), set it up
# again (tpu_setup.sh) and re-run the same command (tpu_run.sh). Stops when the command exits 0; gives up after
# --max-restarts. A failure on a READY VM re-runs the command there after freeing the TPU from leftover processes.
# The VM is created and set up first when it does not exist yet.
#
# A re-run continues from the run's latest checkpoint (`python -m fusion_jax.train` resumes by itself), so run_dir
# must be on storage that outlives the VM and that every worker sees (an NFS share such as Filestore, or a bucket
# mounted with gcsfuse): not the VM's own disk.
#
#   launch/tpu_babysit.sh --name NAME --zone ZONE --accelerator-type TYPE --version RUNTIME
#       (--repo-url URL [--ref REF] | --copy [--src DIR]) [options] -- COMMAND [ARG...]
#
#   --max-restarts N     re-runs after the first run before giving up (default 20)
#   --poll SECONDS       wait after a failed run before reading the state, and between reads while the VM is
#                        changing state (default 30)
#   --dry-run            print one iteration's commands, one per line, and run nothing
#   -h, --help           this help
# Passed to tpu_create.sh: --accelerator-type, --version, --spot, --preemptible, --attempts, --backoff,
#   --max-backoff, and --create-flag FLAG (repeatable: one more flag for `gcloud compute tpus tpu-vm create`).
# Passed to tpu_setup.sh: --repo-url, --ref, --copy, --src, --python, --extras, --post-setup (mount run_dir's
#   storage there: a recreated VM needs it again).
# Passed to tpu_run.sh: --venv, --no-venv, --env KEY=VALUE, --pass-env KEY.
# Passed to all: --name, --zone, --project, --dir.

set -euo pipefail
SCRIPT_NAME=tpu_babysit.sh
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=common.sh
source "$here/common.sh"

name="" zone="" project="" max_restarts=20 poll=30 state_polls=60
DRY_RUN=${DRY_RUN:-0}
create_args=() create_extra=() setup_args=() run_args=() cmd=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$1" "$#"; name=$2; shift 2 ;;
    --zone) need_value "$1" "$#"; zone=$2; shift 2 ;;
    --project) need_value "$1" "$#"; project=$2; shift 2 ;;
    --dir) need_value "$1" "$#"; setup_args+=("$1" "$2"); run_args+=("$1" "$2"); shift 2 ;;
    --accelerator-type | --version | --attempts | --backoff | --max-backoff)
      need_value "$1" "$#"; create_args+=("$1" "$2"); shift 2 ;;
    --spot | --preemptible) create_args+=("$1"); shift ;;
    --create-flag) need_value "$1" "$#"; create_extra+=("$2"); shift 2 ;;
    --repo-url | --ref | --src | --python | --extras | --post-setup)
      need_value "$1" "$#"; setup_args+=("$1" "$2"); shift 2 ;;
    --copy) setup_args+=("$1"); shift ;;
    --pass-env)
      need_value "$1" "$#"
      need_set_env "$2"
      run_args+=("$1" "$2"); shift 2 ;;
    --venv | --env) need_value "$1" "$#"; run_args+=("$1" "$2"); shift 2 ;;
    --no-venv) run_args+=("$1"); shift ;;
    --max-restarts) need_value "$1" "$#"; max_restarts=$2; shift 2 ;;
    --poll) need_value "$1" "$#"; poll=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) print_usage "$0"; exit 0 ;;
    --) shift; cmd=("$@"); break ;;
    *) die_usage "unknown argument '$1' (the command goes after --)" ;;
  esac
done
require --name "$name"
require --zone "$zone"
has() { local a; for a in "${@:2}"; do [[ $a == "$1" ]] && return 0; done; return 1; }
has --accelerator-type ${create_args[@]+"${create_args[@]}"} || die_usage "missing required argument --accelerator-type"
has --version ${create_args[@]+"${create_args[@]}"} || die_usage "missing required argument --version"
if ! has --repo-url ${setup_args[@]+"${setup_args[@]}"} && ! has --copy ${setup_args[@]+"${setup_args[@]}"}; then
  die_usage "missing required argument --repo-url (or --copy)"
fi
if [[ ${#cmd[@]} -eq 0 ]]; then die_usage "missing required argument COMMAND (after --)"; fi
require_uint --max-restarts "$max_restarts"
require_uint --poll "$poll"
set_project "$project"

common=(--name "$name" --zone "$zone")
if [[ -n $project ]]; then common+=(--project "$project"); fi
dry=()
if [[ $DRY_RUN == 1 ]]; then dry=(--dry-run); fi

create_vm() {
  "$here/tpu_create.sh" "${common[@]}" "${create_args[@]}" ${dry[@]+"${dry[@]}"} \
    ${create_extra[@]+-- "${create_extra[@]}"}
}
setup_vm() { "$here/tpu_setup.sh" "${common[@]}" "${setup_args[@]}" ${dry[@]+"${dry[@]}"}; }
run_cmd() {
  "$here/tpu_run.sh" "${common[@]}" ${run_args[@]+"${run_args[@]}"} ${dry[@]+"${dry[@]}"} -- "${cmd[@]}"
}
delete_vm() {
  run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" ${project_flags[@]+"${project_flags[@]}"} --quiet
}
# Kill what still holds the TPU (a previous run's processes on some worker) and drop libtpu's lock file.
free_tpu() {
  "$here/tpu_run.sh" "${common[@]}" --no-venv --dir . ${dry[@]+"${dry[@]}"} -- bash -c \
    'sudo fuser -k /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; sudo rm -f /tmp/libtpu_lockfile; true'
}
vm_lost() { case $1 in PREEMPTED | TERMINATED | STOPPED | NOT_FOUND) return 0 ;; esac; return 1; }

if [[ $DRY_RUN == 1 ]]; then
  note "tpu_babysit: at most 1 + $max_restarts runs of the command, until one exits 0; each iteration:"
  run gcloud compute tpus tpu-vm describe "$name" --zone="$zone" ${project_flags[@]+"${project_flags[@]}"} \
    --format='value(state)'
  note "if $name is PREEMPTED, TERMINATED, STOPPED or not found: delete, recreate, set up"
  delete_vm
  create_vm
  setup_vm
  note "else if the previous run failed on the READY VM: free the TPU"
  free_tpu
  note "then the command"
  run_cmd
  exit 0
fi

# The VM's state once it stops changing (CREATING, REPAIRING, ...), or whatever it is after state_polls reads.
settled_state() {
  local s i
  for ((i = 0; ; i++)); do
    s=$(tpu_state "$name" "$zone")
    case $s in READY | PREEMPTED | TERMINATED | STOPPED | NOT_FOUND | UNKNOWN) break ;; esac
    if [[ $i -ge $state_polls ]]; then break; fi
    note "$name is $s; reading its state again in $poll s"
    pause "$poll"
  done
  printf '%s' "$s"
}

set_up=0  # whether the VM as it is now has been set up by this loop
bring_up() {
  local state
  state=$(settled_state)
  if vm_lost "$state" || [[ $state != READY && $state != UNKNOWN ]]; then
    note "$name is $state: deleting, recreating and setting it up"
    if [[ $state != NOT_FOUND ]]; then delete_vm || true; fi
    set_up=0
    create_vm || return 1
  elif [[ $state == READY && $restarts -gt 0 && $set_up == 1 ]]; then
    note "$name is READY: freeing the TPU from the failed run's processes"
    free_tpu || true
  fi
  if [[ $set_up == 0 ]]; then
    setup_vm || return 1
    set_up=1
  fi
}

restarts=0
while true; do
  if bring_up && run_cmd; then
    note "the command exited 0 (after $restarts restarts)"
    exit 0
  fi
  if [[ $restarts -ge $max_restarts ]]; then
    die "giving up: the command failed after $max_restarts restarts"
  fi
  restarts=$((restarts + 1))
  note "the command failed; restart $restarts of at most $max_restarts"
  pause "$poll"
done
