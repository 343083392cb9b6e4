# Shared by the launch/*.sh scripts (sourced, not run): printing or running commands, quoting, option checks.
# shellcheck shell=bash

# Quote one word the way Python's shlex.quote does: bare when it holds only safe characters, else in single quotes
# (a word with a newline in bash's $'...', so that every printed command stays on one line).
quote_word() {
  local w=$1
  if [[ -z $w ]]; then
    printf "''"
  elif [[ $w =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$w"
  elif [[ $w == *$'\n'* ]]; then
    # keep the command on one line: bash's $'...' with \\, \' and \n escaped
    w=${w//\\/\\\\}
    w=${w//\'/\\\'}
    printf "\$'%s'" "${w//$'\n'/\\n}"
  else
    printf "'%s'" "${w//\'/\'\"\'\"\'}"
  fi
}

# Quote a command line: words joined by spaces, each quoted (shlex.join).
quote_cmd() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(quote_word "$w")"
  done
  printf '%s' "$out"
}

# KEY=VALUE as a shell assignment: the key bare, the value quoted (KEY='a b', not 'KEY=a b').
quote_assign() {
  printf '%s=%s' "${1%%=*}" "$(quote_word "${1#*=}")"
}

# With DRY_RUN=1 print the command (one line, shell-quoted); otherwise run it.
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    "$@"
  fi
}

# A note: a '#' comment on stdout in a dry run (so the output stays a valid script), on stderr otherwise.
note() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '# %s\n' "$*"
  else
    printf '[%s %s] %s\n' "${SCRIPT_NAME:-launch}" "$(date -u +%FT%TZ)" "$*" >&2
  fi
}

# The leading comment block of script $1 (after the shebang, up to the first blank line), without the '# '.
help_text() {
  local line first=1
  while IFS= read -r line || [[ -n $line ]]; do
    if [[ $first == 1 ]]; then first=0; continue; fi
    if [[ -z $line ]]; then break; fi
    if [[ $line == '#'* ]]; then
      line=${line#'#'}
      printf '%s\n' "${line# }"
    fi
  done <"$1"
}

print_usage() {
  help_text "$1"
}

# A usage error: the message, the synopsis (the help's `launch/...` lines and their continuations), exit status 2.
die_usage() {
  local line
  printf '%s: %s\n' "${SCRIPT_NAME:-launch}" "$1" >&2
  printf 'usage:\n' >&2
  while IFS= read -r line; do
    if [[ $line =~ ^\ \ (launch/|[^\ -].*launch/) || $line =~ ^\ {6}[^\ ] ]]; then
      printf '%s\n' "$line" >&2
    fi
  done < <(help_text "$0")
  printf '(%s --help for every option)\n' "${SCRIPT_NAME:-launch}" >&2
  exit 2
}

die() {
  printf '%s: error: %s\n' "${SCRIPT_NAME:-launch}" "$*" >&2
  exit 1
}

# need_value OPTION "$#": the option needs a following argument.
need_value() {
  if [[ $2 -lt 2 ]]; then
    die_usage "option $1 needs a value"
  fi
}

# need_set_env NAME: --pass-env NAME needs a variable name that is set here.
need_set_env() {
  if ! [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then die_usage "--pass-env needs a variable name, got '$1'"; fi
  if [[ -z ${!1+set} ]]; then die_usage "--pass-env $1: $1 is not set here"; fi
}

# require NAME VALUE: a required option that was not given.
require() {
  if [[ -z $2 ]]; then
    die_usage "missing required argument $1"
  fi
}

require_uint() {
  if ! [[ $2 =~ ^[0-9]+$ ]]; then
    die_usage "$1 must be a non-negative integer, got '$2'"
  fi
}

# Sleep unless it is a dry run or zero seconds.
pause() {
  if [[ ${DRY_RUN:-0} != 1 && $1 -gt 0 ]]; then
    sleep "$1"
  fi
}

# gcloud's project flag when --project was given.
project_flags=()
set_project() {
  project_flags=()
  if [[ -n $1 ]]; then
    project_flags=("--project=$1")
  fi
}

# The state of TPU VM $1 in zone $2 ("READY", "PREEMPTED", ...; "NOT_FOUND" when it does not exist; "UNKNOWN"
# when gcloud failed otherwise, its message on stderr). Not for dry runs: it runs gcloud.
tpu_state() {
  local out err rc=0
  err=$(mktemp)
  out=$(gcloud compute tpus tpu-vm describe "$1" --zone="$2" ${project_flags[@]+"${project_flags[@]}"} \
    --format='value(state)' 2>"$err") || rc=$?
  if [[ $rc -eq 0 && -n $out ]]; then
    printf '%s' "$out"
  elif grep -qiE 'NOT_FOUND|not found|was not found' "$err"; then
    printf 'NOT_FOUND'
  else
    sed 's/^/  gcloud: /' "$err" >&2
    printf 'UNKNOWN'
  fi
  rm -f "$err"
}
