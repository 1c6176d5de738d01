#!/usr/bin/env bash
# A new user's first hour, on this machine: clone the repository into a temp dir with an empty HOME (no pip cache,
# no model cache, no shell settings) and run the README's two commands, `make demo` and `make test`, timing each.
# It needs the package registries (pip, through PIP_* and proxy settings if this machine uses them) and nothing
# else: the model hubs are switched off (HF_HUB_OFFLINE), as the embedded models come from packages.
#
#   scripts/fresh_clone_check.sh                                # --dtype auto as this CPU chooses
#   SUPERWEIGHT_AUTO_DTYPE=fp32 scripts/fresh_clone_check.sh    # as on a CPU without native bf16 (passed through)
#   COLUMNS=40 scripts/fresh_clone_check.sh                     # a narrow terminal (passed through)
#   SKIP_DEMO=1 ...   only `make test`;   KEEP=1 ...   keep the temp dir;   PY=python3.12 ...   the Python to use
#
# It clones what is committed (HEAD), not uncommitted changes. Exit status: make test's (or make demo's if it fails).
set -euo pipefail

repo="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
work="$(mktemp -d "${TMPDIR:-/tmp}/superweight-fresh-XXXXXX")"
if [ -z "${KEEP:-}" ]; then trap 'rm -rf "$work"' EXIT; fi
git clone -q "$repo" "$work/repo"
mkdir -p "$work/home" "$work/tmp"
echo "fresh clone of $(git -C "$repo" rev-parse --short HEAD) in $work/repo, HOME=$work/home"

# An environment of its own: only what a new user's shell would have, plus what reaching a registry needs.
envs=(PATH="$PATH" HOME="$work/home" TMPDIR="$work/tmp" LANG=C.UTF-8 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
      HF_DATASETS_OFFLINE=1)
# pip's settings (PIP_*: index, find-links, certificates) say how this machine reaches the registries, not what
# a user has done; so does a user pip.conf, which the empty HOME would hide: it is passed as PIP_CONFIG_FILE.
for name in SUPERWEIGHT_AUTO_DTYPE COLUMNS XDG_CONFIG_DIRS http_proxy https_proxy HTTP_PROXY HTTPS_PROXY no_proxy \
            NO_PROXY $(compgen -e | grep '^PIP_' || true); do
  if [ -n "${!name:-}" ]; then envs+=("$name=${!name}"); fi
done
for conf in "${XDG_CONFIG_HOME:-$HOME/.config}/pip/pip.conf" "$HOME/.pip/pip.conf"; do
  if [ -z "${PIP_CONFIG_FILE:-}" ] && [ -f "$conf" ]; then envs+=("PIP_CONFIG_FILE=$conf"); break; fi
done
echo "environment: ${envs[*]}"
# The Makefile's python3, resolved here: a version manager's shim (pyenv) looks for its versions under HOME.
PY="${PY:-$(python3 -c 'import sys; print(sys.executable)')}"
make_args=("PY=$PY")

step() {  # step NAME: run `make NAME` in the clone, print its time
  local start=$SECONDS status=0
  echo "=== make $1"
  (cd "$work/repo" && env -i "${envs[@]}" make "${make_args[@]}" "$1") || status=$?
  echo "=== make $1: exit $status after $((SECONDS - start)) s"
  times+=("make $1: $((SECONDS - start)) s (exit $status)")
  return $status
}

times=()
status=0
nproc_=$(nproc 2>/dev/null || echo "?")
# `make setup` (the venv and every package) runs first on its own, so the two commands' times are their own.
step setup || status=$?
if [ $status -eq 0 ] && [ -z "${SKIP_DEMO:-}" ]; then step demo || status=$?; fi
if [ $status -eq 0 ]; then step test || status=$?; fi
echo "=== summary ($nproc_ cores, SUPERWEIGHT_AUTO_DTYPE=${SUPERWEIGHT_AUTO_DTYPE:-unset}, COLUMNS=${COLUMNS:-unset})"
printf '%s\n' "${times[@]}"
exit $status
