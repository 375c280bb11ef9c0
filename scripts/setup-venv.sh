#!/usr/bin/env bash
# Creates (or reuses) the cached Python venvs: $GW_VENV with the pinned test tools
# (scripts/requirements-test.txt) and $GW_MODELS_VENV with the model toolchain
# (abi/requirements.txt; NumPy 1.x, see there). Idempotent: a venv is rebuilt only
# when its requirements file changes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ensure_venv() { # DIR REQUIREMENTS
  local venv="$1" req="$2" stamp want
  stamp="$venv/.requirements.sha256"
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  command -v python3 >/dev/null || die "python3 is required (3.10 or newer)"
  log "creating Python venv at $venv (${req#"$GW_ROOT"/})"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
}

ensure_venv "$GW_VENV" "$GW_ROOT/scripts/requirements-test.txt"
ensure_venv "$GW_MODELS_VENV" "$GW_ROOT/abi/requirements.txt"
