#!/usr/bin/env bash
# One process of a multi-node GPU job: srun starts this once per task (launch/slurm_gpu.sbatch does). It turns the
# task's SLURM variables into JAX's distributed settings, which fusion_jax.mesh.initialize_distributed reads, and
# runs the command in the checkout with its venv active.
#   JAX_COORDINATOR_ADDRESS  --coordinator (the first node of the job and a port; process 0 serves there)
#   JAX_NUM_PROCESSES        SLURM_NTASKS
#   JAX_PROCESS_ID           SLURM_PROCID
#   JAX_LOCAL_DEVICE_IDS     the GPUs this process drives: all of the node's with --process-per node, the task's
#                            own (SLURM_LOCALID, or 0 when SLURM gave the task a single visible GPU) with gpu
#
#   launch/slurm_task.sh --coordinator HOST:PORT --process-per node|gpu --gpus-per-node N --dir DIR
#       [--venv PATH | --no-venv] [--env KEY=VALUE]... -- COMMAND [ARG...]
#
# With DRY_RUN=1 it prints the process's environment and command (one line) instead of running it.

set -euo pipefail
SCRIPT_NAME=slurm_task.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

coordinator="" per="" gpus="" dir="" venv=.venv
DRY_RUN=${DRY_RUN:-0}
envs=() cmd=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --coordinator) need_value "$1" "$#"; coordinator=$2; shift 2 ;;
    --process-per) need_value "$1" "$#"; per=$2; shift 2 ;;
    --gpus-per-node) need_value "$1" "$#"; gpus=$2; shift 2 ;;
    --dir) need_value "$1" "$#"; dir=$2; shift 2 ;;
    --venv) need_value "$1" "$#"; venv=$2; shift 2 ;;
    --no-venv) venv=""; shift ;;
    --env)
      need_value "$1" "$#"
      if ! [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then die_usage "--env needs KEY=VALUE, got '$2'"; fi
      envs+=("$2"); shift 2 ;;
    -h | --help) print_usage "$0"; exit 0 ;;
    --) shift; cmd=("$@"); break ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
done
require --coordinator "$coordinator"
require --process-per "$per"
require --gpus-per-node "$gpus"
require --dir "$dir"
require_uint --gpus-per-node "$gpus"
if [[ ${#cmd[@]} -eq 0 ]]; then die_usage "missing required argument COMMAND (after --)"; fi
for v in SLURM_NTASKS SLURM_PROCID SLURM_LOCALID; do
  if [[ -z ${!v:-} ]]; then die "$v is not set: run this under srun (launch/slurm_gpu.sbatch does)"; fi
done

# How many GPUs this task sees: CUDA_VISIBLE_DEVICES when SLURM set it, else the node's count.
visible=$gpus
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -r -a vis <<<"$CUDA_VISIBLE_DEVICES"
  visible=${#vis[@]}
fi
case $per in
  node) local_ids=$(seq -s, 0 $((visible - 1))) ;;
  gpu) if [[ $visible -eq 1 ]]; then local_ids=0; else local_ids=$SLURM_LOCALID; fi ;;
  *) die_usage "--process-per must be node or gpu, got '$per'" ;;
esac

export JAX_COORDINATOR_ADDRESS=$coordinator
export JAX_NUM_PROCESSES=$SLURM_NTASKS
export JAX_PROCESS_ID=$SLURM_PROCID
export JAX_LOCAL_DEVICE_IDS=$local_ids
jax_env=("JAX_COORDINATOR_ADDRESS=$coordinator" "JAX_NUM_PROCESSES=$SLURM_NTASKS" "JAX_PROCESS_ID=$SLURM_PROCID"
  "JAX_LOCAL_DEVICE_IDS=$local_ids")
for kv in ${envs[@]+"${envs[@]}"}; do
  export "${kv?}"
done

if [[ $DRY_RUN == 1 ]]; then
  note "process $SLURM_PROCID of $SLURM_NTASKS on ${SLURMD_NODENAME:-$(hostname)} (local task $SLURM_LOCALID)," \
    "in $dir${venv:+ with $venv active}"
  line=""
  for kv in "${jax_env[@]}" ${envs[@]+"${envs[@]}"}; do
    line+="$(quote_assign "$kv") "
  done
  printf '%s%s\n' "$line" "$(quote_cmd "${cmd[@]}")"
  exit 0
fi
cd "$dir"
if [[ -n $venv ]]; then
  # shellcheck source=/dev/null
  source "$venv/bin/activate"
fi
exec "${cmd[@]}"
