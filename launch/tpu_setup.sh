#!/usr/bin/env bash
# Set up fusion_jax on every worker of a TPU VM: the code (a git clone, or a copy of this checkout), a venv and
# `pip install -e '.[tpu]'`. Safe to re-run: an existing clone is fetched, an existing venv reused.
#
#   launch/tpu_setup.sh --name NAME --zone ZONE (--repo-url URL [--ref REF] | --copy [--src DIR]) [options]
#
#   --name NAME          the TPU VM's name
#   --zone ZONE          its zone
#   --repo-url URL       clone this repository on each worker (it must be readable from the VM)...
#   --ref REF            ...and check out this branch, tag or commit (default HEAD: the remote's default branch)
#   --copy               or copy this checkout instead: the files git lists (tracked, and untracked but not
#                        ignored; so no .venv or runs/), packed into one tarball and sent with
#                        `gcloud compute tpus tpu-vm scp`
#   --src DIR            the checkout to copy (default: the one holding this script)
#   --dir DIR            where the code goes on each worker, relative to the home directory (default fusion_jax)
#   --python PYTHON      the interpreter for the venv (default python3.11; installed with apt when missing)
#   --extras EXTRAS      pip extras to install (default tpu: jax[tpu], gcsfs for gs:// paths)
#   --post-setup TEXT    shell text each worker runs last, in DIR, e.g. mounting the shared storage for run_dir:
#                        'sudo mkdir -p /mnt/shared && sudo mount -t nfs 10.1.2.3:/share /mnt/shared'
#   --project PROJECT    default: gcloud's configured project
#   --worker WORKER      all (default) or one worker's index
#   --dry-run            print the commands, one per line, and run nothing
#   -h, --help           this help

set -euo pipefail
SCRIPT_NAME=tpu_setup.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

name="" zone="" repo_url="" ref=HEAD copy=0 project="" worker=all
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=fusion_jax python=python3.11 extras=tpu post=""
DRY_RUN=${DRY_RUN:-0}
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$1" "$#"; name=$2; shift 2 ;;
    --zone) need_value "$1" "$#"; zone=$2; shift 2 ;;
    --repo-url) need_value "$1" "$#"; repo_url=$2; shift 2 ;;
    --ref) need_value "$1" "$#"; ref=$2; shift 2 ;;
    --copy) copy=1; shift ;;
    --src) need_value "$1" "$#"; src=$2; shift 2 ;;
    --dir) need_value "$1" "$#"; dir=$2; shift 2 ;;
    --python) need_value "$1" "$#"; python=$2; shift 2 ;;
    --extras) need_value "$1" "$#"; extras=$2; shift 2 ;;
    --post-setup) need_value "$1" "$#"; post=$2; shift 2 ;;
    --project) need_value "$1" "$#"; project=$2; shift 2 ;;
    --worker) need_value "$1" "$#"; worker=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) print_usage "$0"; exit 0 ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
done
require --name "$name"
require --zone "$zone"
if [[ -z $repo_url && $copy == 0 ]]; then die_usage "missing required argument --repo-url (or --copy)"; fi
if [[ -n $repo_url && $copy == 1 ]]; then die_usage "--repo-url and --copy exclude each other"; fi
require --dir "$dir"
set_project "$project"

qdir=$(quote_word "$dir")
qpy=$(quote_word "$python")
# The environment on each worker: python (apt when missing), the venv, the package with its extras.
install="cd $qdir"
install+=" && { command -v $qpy >/dev/null || { sudo apt-get update -qq && sudo env DEBIAN_FRONTEND=noninteractive"
install+=" apt-get install -y -qq $qpy $(quote_word "$python-venv"); }; }"
install+=" && { test -x .venv/bin/python || $qpy -m venv .venv; }"
install+=" && .venv/bin/python -m pip install -q --upgrade pip"
install+=" && .venv/bin/python -m pip install -q -e $(quote_word ".[$extras]")"
if [[ -n $post ]]; then install+=" && ( $post )"; fi

ssh=(gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker="$worker" ${project_flags[@]+"${project_flags[@]}"})

if [[ $copy == 1 ]]; then
  tmp=${TMPDIR:-/tmp}
  tarball="$tmp/fusion_jax_src_$name.tar.gz"
  list="$tmp/fusion_jax_src_$name.files"
  remote_tar=fusion_jax_src.tar.gz
  note "files to copy: git -C $(quote_word "$src") ls-files --cached --others --exclude-standard" \
    "(those that exist) > $(quote_word "$list")"
  if [[ $DRY_RUN != 1 ]]; then
    git -C "$src" rev-parse --git-dir >/dev/null 2>&1 || die "--src $src is not a git checkout (use --repo-url)"
    : >"$list"
    while IFS= read -r -d '' f; do
      if [[ -e $src/$f ]]; then printf '%s\0' "$f" >>"$list"; fi
    done < <(git -C "$src" ls-files -z --cached --others --exclude-standard)
  fi
  run env COPYFILE_DISABLE=1 tar -czf "$tarball" -C "$src" --null -T "$list"  # (no macOS ._ files)
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:$remote_tar" --zone="$zone" --worker="$worker" \
    ${project_flags[@]+"${project_flags[@]}"}
  run rm -f "$tarball" "$list"
  fetch="mkdir -p $qdir && tar -xzf $remote_tar -C $qdir && rm -f $remote_tar"
else
  fetch="{ test -d $(quote_word "$dir/.git") || git clone -q $(quote_word "$repo_url") $qdir; }"
  fetch+=" && git -C $qdir fetch -q origin $(quote_word "$ref") && git -C $qdir checkout -q --detach FETCH_HEAD"
fi
note "setting up $name (worker $worker): code in ~/$dir, venv ~/$dir/.venv with .[$extras]"
run "${ssh[@]}" --command="$fetch && $install"
